"""Test-side launcher: ``moelab.train.train`` (or ``resume``) in a fresh process, with a callback that stops the
process at an exact moment, so a test can SIGKILL it there or watch it handle a signal.

    python tests/train_launcher.py CONFIG OUT --marker FILE --hang-step 5:0     # after micro-batch 0 of step 5
    python tests/train_launcher.py CONFIG OUT --marker FILE --hang-stage 6:written   # inside checkpoint 6's write
    python tests/train_launcher.py CONFIG OUT --sigterm-step 5                  # SIGTERM to itself before step 5

``--hang-*`` writes FILE (atomically, once the process is at that moment) and then sleeps until killed; the stages
are those of ``Callback.on_checkpoint_stage`` (written, manifest, committed, done, final_written, ...).
Not collected by pytest (no ``test_`` prefix); imported by nothing in moelab.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path

from moelab.train import Callback, train


class HangAt(Callback):
    """Announce through ``marker`` and sleep forever at one (step, micro-batch) or (step, checkpoint stage)."""

    def __init__(self, marker: Path, step: int, micro: int | None = None, stage: str | None = None):
        self.marker, self.step, self.micro, self.stage = marker, step, micro, stage

    def _hang(self) -> None:
        tmp = self.marker.with_name(self.marker.name + ".tmp")
        tmp.write_text(str(os.getpid()))
        os.replace(tmp, self.marker)
        while True:
            time.sleep(1)

    def on_micro_batch_end(self, ctx, step, index):
        if self.micro is not None and (step, index) == (self.step, self.micro):
            self._hang()

    def on_checkpoint_stage(self, ctx, step, stage, path):
        if self.stage is not None and (step, stage) == (self.step, self.stage):
            self._hang()


class SigtermAt(Callback):
    """Deliver SIGTERM to this process just before step ``step`` (a cluster's pre-emption notice)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_start(self, ctx, step):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("out")
    p.add_argument("--marker", type=Path)
    p.add_argument("--hang-step", metavar="STEP:MICRO")
    p.add_argument("--hang-stage", metavar="STEP:STAGE")
    p.add_argument("--sigterm-step", type=int)
    a = p.parse_args()
    callbacks: list[Callback] = []
    if a.hang_step:
        step, micro = a.hang_step.split(":")
        callbacks.append(HangAt(a.marker, int(step), micro=int(micro)))
    if a.hang_stage:
        step, stage = a.hang_stage.split(":")
        callbacks.append(HangAt(a.marker, int(step), stage=stage))
    if a.sigterm_step:
        callbacks.append(SigtermAt(a.sigterm_step))
    result = train(a.config, a.out, progress=False, callbacks=callbacks)
    print(f"{result.status} at step {result.step}")


if __name__ == "__main__":
    main()
