"""Keras, imported without TensorFlow's start-up lines; `--verbose` on the command line, or CAPTCHA_VERBOSE=1, keeps them.

    import quiet  # noqa: F401  (before `import keras`, in every module that imports it)

As its native libraries load, TensorFlow prints lines that no setting silences: absl's "All log messages before
absl::InitializeLog()", oneDNN, cpu_feature_guard, the CUDA stubs. So the import runs with the process's native
stderr (file descriptor 2) pointed at /dev/null, and is then restored: Python's messages, tracebacks included, are
never touched. Later native lines (cuInit's error on a machine without a GPU) obey TF_CPP_MIN_LOG_LEVEL, set to 3
(errors too) before the import. The Python loggers of TensorFlow and absl (tf.function retracing notes) show errors
only.
"""

import contextlib
import logging
import os
import sys

VERBOSE = "--verbose" in sys.argv[1:] or os.environ.get("CAPTCHA_VERBOSE", "") not in ("", "0")


@contextlib.contextmanager
def native_stderr_off():
    """File descriptor 2 at /dev/null inside the block (for native code writing past Python's sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


if not VERBOSE and "keras" not in sys.modules:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for name in ("tensorflow", "absl"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with native_stderr_off():
        import keras  # noqa: F401  (and with it the backend: TensorFlow by default)
