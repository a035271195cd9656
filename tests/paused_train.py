"""train.py that stops to wait inside a training step of its second epoch, so a test can interrupt it there.

    python tests/paused_train.py MARKER [train.py flags]

The second step of epoch 2 runs, then, before it hands its result back to fit(), creates MARKER and
waits: for train.py to note a stop signal, or for SIGKILL. A signal then lands inside a step, the hard
case (under JAX the step holds the weights' buffers), and the test knows exactly where training
stands however busy the machine is.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import callbacks
import train  # noqa: E402


class PauseInEpochTwo(callbacks.ResumeCheckpoint):
    def on_train_begin(self, logs=None):
        step = self.model.train_function  # compiled by fit() just before this callback
        calls = [0]

        def paused_step(*args, **kwargs):
            result = step(*args, **kwargs)
            calls[0] += 1
            if self.epochs_done == 1 and calls[0] == self.params["steps"] + 2:
                Path(MARKER).touch()
                while callbacks.STOP.signal is None:  # a first stop signal is only noted while a step runs
                    time.sleep(0.05)
            return result

        self.model.train_function = paused_step


if __name__ == "__main__":
    MARKER = sys.argv[1]
    callbacks.ResumeCheckpoint = PauseInEpochTwo
    sys.exit(train.main(sys.argv[2:]))
