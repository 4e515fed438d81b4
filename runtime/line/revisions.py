"""The model the line runs changes here only: commissioning's fitted threshold and, after it, the bank grown from
the commissioning frames (commissioning.learn; again once operators sorted the commissioning review), each a new
bundle revision the inspector takes between two batches (no verdict lost), the box's `current` link moved to it for
the next start, and who owns each camera's threshold said with all three values."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from coft.runtime.config import RuntimeConfig
from coft.runtime.engines import Engine, fitted_precision, open_engine
from coft.runtime.line.commissioning import Commissioning
from coft.runtime.line.evidence import feedback_folder
from coft.runtime.line.inspector import Inspector
from coft.runtime.line.verdict import Verdict
from coft.runtime.model.bundle import (
    Bundle,
    clean_staging,
    commissioned_ancestor,
    commissioned_revision,
    load_bundle,
    revise,
)
from coft.runtime.model.errors import CoftError, NoRoom
from coft.runtime.model.promise import describe
from coft.runtime.model.store import switch
from coft.runtime.process.disk import Reserve
from coft.runtime.process.metrics import Metrics

log = logging.getLogger(__name__)
LEARN_WAIT_S, LEARN_WAIT_MAX_S = 300.0, 3600.0  # learning again after the disk refused it: 5 min, doubling to 1 h


class Revisions:
    def __init__(self, config: RuntimeConfig, inspector: Inspector, metrics: Metrics, reserve: Reserve,
                 on_switched: Callable[[], None]):
        self.config, self.inspector, self.metrics, self.reserve = config, inspector, metrics, reserve
        self.on_switched = on_switched  # the root publishes each camera's threshold state anew
        self.cameras = [c.name for c in config.cameras]
        self.learns = self.learns_with(config, inspector.bundle)
        self.commissioning: Commissioning | None = None
        self.learning: dict | None = None  # the learner's state after commissioning (status)
        self._grown: tuple[Bundle, Engine] | None = None  # what the learner made, for the inspector to take
        self.learn_wait_s = LEARN_WAIT_S / 2  # before learning again after the disk refused it (doubles each time)
        self._learn_lock = threading.Lock()  # the page's sorting and commissioning may each start learning
        clean_staging(inspector.bundle.path.resolve().parent)  # a crash loop while learning must not fill the disk

    @staticmethod
    def learns_with(config: RuntimeConfig, bundle: Bundle) -> bool:
        """Whether this line grows its bank after commissioning (commissioning.learn, knn bundles only)."""
        return bool(config.commissioning and config.commissioning.learn and bundle.spec.scorer == "knn")

    def start_commissioning(self, again: bool) -> None:
        self.commissioning = self.inspector.commissioning = self._planned(again)

    def between_batches(self) -> None:
        """On the inspector's thread, before a batch: the learner's model, if it has made one."""
        if self._grown:
            (grown, engine), self._grown = self._grown, None
            self._switch(grown, engine, self.inspector.bundle.threshold, "learn")

    def after_batch(self) -> None:
        if self.commissioning is not None and self.commissioning.complete:
            self.finish_commissioning()

    def status(self) -> dict | None:
        """How far commissioning is, and whether rejects fire meanwhile; None when the line is not commissioning."""
        if self.commissioning is None or self.commissioning.complete or self.config.commissioning is None:
            return None
        return {"frames": len(self.commissioning.scores), "of": self.commissioning.wanted,
                "rejects_fired": self.config.commissioning.rejects}

    def check_precision(self) -> None:
        """Say where the engine the line runs (auto's choice, known after the warm-up) computes in another precision
        than the scores its threshold was fitted on: that threshold then holds no longer. A line commissioning now
        fits its own."""
        fitted_on = fitted_precision(self.inspector.bundle.spec)
        engine = self.inspector.engine
        if self.commissioning is None and fitted_on and fitted_on != engine.precision:
            log.warning("commissioning: %s's threshold was fitted on %s scores and this box's %s computes in %s, "
                        "whose scores differ; commission again ('coft commission') or choose a backend that computes "
                        "in %s", self.inspector.bundle.model_id, fitted_on, engine.name, engine.precision, fitted_on)

    def _planned(self, again: bool) -> Commissioning | None:
        """Commission only a bundle not yet commissioned for these cameras (or when asked again): a restart, by
        the watchdog, a crash or a reboot, resumes inspection at once with the commissioned threshold."""
        plan = self.config.commissioning
        if not plan:
            return None
        if not again:
            done = self.inspector.bundle.spec.commissioning
            if done is not None and set(self.cameras) <= set(done.cameras):
                log.info("commissioning: %s was commissioned for %s on %d frames; inspecting at once at its threshold "
                         "(%.6g); 'coft commission' fits it again", self.inspector.bundle.model_id, ", ".join(self.cameras),
                         done.frames or 0, self.inspector.bundle.threshold)
                return None
            revision = commissioned_revision(self.inspector.bundle.path, self.inspector.bundle.model_id, self.cameras)
            if revision is not None:
                self.inspector.adopt(load_bundle(revision, self.config.trusted_keys))
                log.warning("commissioning: %s was already commissioned as %s; running that (threshold %.6g). Point "
                            "bundle: in the config at it", self.config.bundle, revision, self.inspector.bundle.threshold)
                return None
        if plan.rejects:
            log.info("commissioning: the first %d frames set the threshold; meanwhile rejects fire at the bundle's "
                     "threshold (%.6g), flagged commissioning", plan.frames, self.inspector.bundle.threshold)
        else:
            log.warning("commissioning: REJECTS ARE OFF until %d frames have set the threshold "
                        "(commissioning.rejects: false): every part passes meanwhile", plan.frames)
        return Commissioning(plan.frames, plan.target_false_reject_rate,
                             self.config.outbox.path.parent / f"commissioning-{self.inspector.bundle.model_id}"
                             if plan.keep_frames else None, self.reserve)


    def finish_commissioning(self) -> None:
        """Fit the line's threshold, write it as a new bundle revision, switch to it in place (no restart,
        no verdict lost) and, where `bundle:` is a box's `current` link, point that at it for the next start."""
        commissioning, self.commissioning = self.commissioning, None
        self.inspector.commissioning = None
        if commissioning is None:
            return
        old = self.inspector.bundle.threshold
        try:  # the fit reads the bundle's threshold record whole: where its good parts scored, its target
            fitted = commissioning.fit(self.inspector.bundle.manifest["threshold"])
        except CoftError as exc:
            log.error("commissioning: %s", exc)
            return
        traded = commissioning.traded(old, fitted["value"], self.marked_defect_scores())
        log.info("commissioning: %d frames, %d suspects dropped, threshold %.6g -> %.6g: %s\n%s", fitted["frames"],
                 fitted["suspects_dropped"], old, fitted["value"], describe(fitted),
                 commissioning.histogram(old, fitted["value"]))
        log.info("commissioning: what the new threshold trades: %s", commissioning.say_traded(traded))
        try:
            revision = revise(self.inspector.bundle.path.resolve(), {"threshold": fitted, "commissioning": {
                "frames": fitted["frames"], "suspects_dropped": fitted["suspects_dropped"],
                "quantile": 1 - fitted["target_false_reject_rate"], "cameras": sorted(self.cameras),
                "frames_folder": str(commissioning.folder) if commissioning.folder else None, "traded": traded,
                "engine": self.inspector.engine.name, "precision": self.inspector.engine.precision}})  # bf16, int8 move scores
        except (CoftError, OSError) as exc:
            log.error("commissioning: cannot write the new bundle revision beside %s (%s); keeping the old threshold",
                      self.inspector.bundle.path, exc)
            return
        try:
            written = load_bundle(revision, self.config.trusted_keys)
        except CoftError as exc:  # the line goes on judging with the old threshold: no frame waits on this
            log.error("commissioning: the revision %s does not load (%s); judging on with the old threshold",
                      revision, exc)
            return
        self._switch(written, self.inspector.engine, old, "commissioning")
        if self.learns and commissioning.folder:
            self._start_learning(revision, commissioning.folder)


    def marked_defect_scores(self) -> list[float]:
        """Scores of the frames operators marked as real defects on this model's graph (where the page files them,
        line/evidence.py): what an escape can be measured on."""
        folder = feedback_folder("defect", self.config.harvest.dir if self.config.harvest else None,
                                 self.config.evidence.dir if self.config.evidence else None)
        model_id = self.inspector.bundle.model_id
        scores = []
        for verdict_file in folder.glob("*.json") if folder and folder.is_dir() else ():
            try:
                verdict = Verdict.from_json(json.loads(verdict_file.read_text()))
                if verdict.model_id == model_id and verdict.score is not None:  # scored on the graph running now
                    scores.append(float(verdict.score))
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("commissioning: %s is not a verdict file; left out of the escape", verdict_file)
        return scores

    def _start_learning(self, revision, frames) -> None:
        self.learning = {"state": "learning", "frames": str(frames)}  # at once: a second start must see it
        threading.Thread(target=self._learn, args=(revision, frames), name="learner", daemon=True).start()

    def learn_from_review(self, via: str) -> str:
        """Operators have sorted every frame of the commissioning review: the bank grows again, from the revision
        commissioning wrote and its frames with their word (the good ones offer their patches whatever they
        scored, the defects become defect rows), in the background as after commissioning. What learning
        right after commissioning had to leave out is often the rare good look the shots lacked (docs/learning.md:
        on ELPV, 16 clicks took escape at 1% false-reject from 84% to 30%). Says what it does, in one line."""
        bundle = self.inspector.bundle
        done = bundle.spec.commissioning
        commissioned = commissioned_ancestor(bundle.path, bundle.manifest)
        if commissioned is None or done is None or not done.frames_folder:
            return "nothing to learn from: commissioning kept no frames"
        folder = Path(done.frames_folder)
        by_hand = f"run 'coft learn {commissioned[0]} {folder}' to grow the bank with the review"
        if not self.learns:
            return f"the line does not learn by itself (commissioning.learn: false): {by_hand}"
        with self._learn_lock:
            if (self.learning or {}).get("state") == "learning":
                return f"learning is running now; once it is done, {by_hand}"
            log.info("learn: the commissioning review is sorted (via %s); growing the bank again from %s's frames in "
                     "%s, with the operators' word", via, commissioned[0].name, folder)
            self._start_learning(commissioned[0], folder)
        return f"learning from the review: {bundle.model_id} grows again from {commissioned[0].name}"


    def resume_learning(self) -> None:
        """A start that finds the bundle commissioned but not yet learned from its commissioning frames (the runtime
        stopped while learning, or learning failed) learns now: a restart must not drop the step silently."""
        if not self.learns:
            return
        if "learning" in self.inspector.bundle.manifest:
            self.learning = {"state": "done", "revision": self.inspector.bundle.model_id}
            self.metrics.learning.state("done")
            return
        done = self.inspector.bundle.spec.commissioning
        folder = Path(done.frames_folder) if done is not None and done.frames_folder else None
        if self.commissioning is not None or folder is None:
            self.metrics.learning.state("waiting")
            return
        if not folder.is_dir():
            log.error("learn: %s was commissioned but its bank was never grown, and its commissioning frames (%s) are "
                      "gone; run 'coft learn' on a folder of the line's frames", self.inspector.bundle.model_id, folder)
            self.learning = {"state": "failed", "error": f"commissioning frames gone: {folder}"}
            self.metrics.learning.state("failed")
            return
        log.warning("learn: %s was commissioned but its bank was not yet grown from %s (the runtime stopped, or "
                    "learning failed, before); growing it now", self.inspector.bundle.model_id, folder)
        self._start_learning(self.inspector.bundle.path, folder)


    def _switch(self, bundle, engine, old: float, why: str) -> None:
        """Judge with this revision from now on (between two batches: no verdict lost), say who owns each camera's
        threshold, and where `bundle:` is a box's `current` link, point that at it for the next start."""
        operators = self.inspector.threshold.operators()
        self.inspector.adopt(bundle, engine)
        for camera in self.cameras:
            self._owner_after(why, camera, old, bundle.threshold, operators.get(camera))
        self.on_switched()
        if self.config.bundle.is_symlink():
            try:
                switch(self.config.bundle, bundle.path)
            except OSError as exc:
                log.error("%s: cannot point %s at %s (%s); the next start runs the old bundle", why,
                          self.config.bundle, bundle.path, exc.strerror)
        log.info("%s done: now running %s (threshold %.6g); it is in %s", why, self.inspector.bundle.model_id,
                 self.inspector.bundle.threshold, bundle.path)
        if not self.config.bundle.is_symlink():  # the next start would run the old bundle: that needs a person
            log.warning("%s: the next start runs %s again; point bundle: in the config at %s", why,
                        self.config.bundle, bundle.path)


    def _learn(self, revision, frames) -> None:
        """After commissioning: the bank grown from the commissioning frames (coft learn), in the background at
        a low priority (nice 10: about a tenth of a core a busy inspector leaves, so it still ends) and on one
        thread; the inspector takes the new model between batches. A failure keeps the commissioned model and
        says why."""
        from coft.runtime.line.learning import learn
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)  # Linux: this thread only
        except (AttributeError, OSError):
            pass
        self.metrics.learning.state("learning")
        log.info("learn: growing the bank from the %s frames in %s, in the background", self.inspector.bundle.model_id, frames)
        try:
            grown = load_bundle(learn(revision, frames, threads=1, room=self.reserve.allows), self.config.trusted_keys)
            self._grown = (grown, open_engine(grown, self.inspector.engine.name, self.config.threads))
        except NoRoom as exc:  # the disk is kept for verdicts: try again later, each time waiting twice as long
            self.learn_wait_s = min(2 * self.learn_wait_s, LEARN_WAIT_MAX_S)
            log.error("learn: %s; trying again in %.0f min", exc, self.learn_wait_s / 60)
            self.learning = {"state": "failed", "error": str(exc)[:300], "retry_in_s": self.learn_wait_s}
            self.metrics.learning.state("failed")
            retry = threading.Timer(self.learn_wait_s, self._start_learning, (revision, frames))
            retry.daemon = True
            retry.start()
            return
        except Exception as exc:  # noqa: BLE001  (whatever it was, the line inspects on with the commissioned model)
            log.error("learn: %s; inspecting on with the commissioned bank", exc)
            self.learning = {"state": "failed", "error": str(exc)[:300]}
            self.metrics.learning.state("failed")
            return
        learned = grown.spec.learning
        self.learning = {"state": "done", "revision": grown.model_id,
                         **(learned.model_dump(include={"frames", "frames_in_bank", "suspects", "rows_added"})
                            if learned else {})}
        self.metrics.learning.state("done")


    def _owner_after(self, why: str, camera: str, bundle: float, fitted: float,
                     operator: tuple[float, str] | None) -> None:
        """Say who owns the camera's threshold now that commissioning (or learning) fitted one, with all three
        values: an operator's stays in force until an operator sets the fitted one (unless
        commissioning.keep_operator_threshold is false)."""
        if operator is None:
            log.info("%s: camera %s: threshold %.6g (fitted by %s; the previous bundle's was %.6g, no operator had "
                     "set one)", why, camera, fitted, why, bundle)
            return
        value, source = operator
        if self.config.commissioning is not None and not self.config.commissioning.keep_operator_threshold:
            log.warning("%s: camera %s: the fitted threshold %.6g replaces the operator's %.6g (%s; the previous "
                        "bundle's was %.6g): commissioning.keep_operator_threshold is false",
                        why, camera, fitted, value, source, bundle)
            return
        try:
            self.inspector.threshold.keep(camera, value, f"{source}, kept over {why}'s {fitted:.6g}")
        except CoftError as exc:
            log.warning("%s: camera %s: the operator's threshold %.6g (%s) cannot stay (%s); the fitted %.6g is in "
                        "force", why, camera, value, source, exc, fitted)
            return
        log.warning("%s: camera %s: the operator's threshold %.6g (%s) stays in force; %s fitted %.6g (the previous "
                    "bundle's was %.6g): an operator who accepts it sets %.6g (set/threshold or the page)",
                    why, camera, value, source, why, fitted, bundle, fitted)
