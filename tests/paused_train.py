"""train.py that stops to wait in the middle of its second epoch, so a test can interrupt it there.

    python tests/paused_train.py MARKER [train.py flags]

After the second batch of epoch 2 it creates MARKER and sleeps until a signal arrives (or SIGKILL):
the test knows exactly where training stands, however busy the machine is.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train  # noqa: E402


class PauseInEpochTwo(train.ResumeCheckpoint):
    def on_train_batch_end(self, batch, logs=None):
        if self.epochs_done == 1 and batch == 1:
            Path(MARKER).touch()
            while True:  # a signal's KeyboardInterrupt ends this, as it would end a training step
                time.sleep(0.05)


if __name__ == "__main__":
    MARKER = sys.argv[1]
    train.ResumeCheckpoint = PauseInEpochTwo
    sys.exit(train.main(sys.argv[2:]))
