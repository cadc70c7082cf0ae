"""Ax's Bayesian optimisation as a Ray Tune searcher, through Ax's current ``ax.Client`` API.

Ray's own ``AxSearch`` wraps ``AxClient``, which Ax deprecated (to be removed in 1.4) and which
breaks with ax-platform 1.3 (``'Objective' object has no attribute 'objectives'``). This searcher
drives ``ax.Client`` instead: Tune asks :meth:`suggest` for a trial's parameters
(``get_next_trials``), every intermediate result is attached as data at its training step
(``attach_data(progression=step)``), and a trial's end completes it in Ax, marks it early-stopped
(stopped by ASHA after some evaluations) or failed. Its state (Ax's JSON snapshot and the map from
Ray trial ids to Ax trial indices) is what Tune saves with the experiment, so an interrupted
search resumes with every observation Ax had.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from ray.tune.search import Searcher

from hpc_reid.atomic import write_atomic
from hpc_reid.engine.errors import TrainingError
from hpc_reid.tune.space import SearchSpace

log = logging.getLogger(__name__)


class SearchError(TrainingError):
    """The search cannot go on (e.g. no suggestion satisfies the space's constraints)."""


class AxClientSearcher(Searcher):
    """Suggest trial parameters with an ``ax.Client`` over ``space``; maximise ``metric``.

    ``seed`` seeds Ax's quasi-random initialisation and its model fitting, so the same space,
    seed and observations give the same suggestions. ``init_trials`` overrides Ax's choice of the
    number of quasi-random (Sobol) trials before Bayesian optimisation takes over.
    ``snapshot_path``: also write Ax's experiment JSON there after every finished trial.
    ``max_rejections``: suggestions breaking a constraint Ax cannot enforce (e.g. P*K) are
    abandoned and replaced at most this many times in a row before the search stops.
    """

    def __init__(
        self,
        space: SearchSpace,
        *,
        metric: str = "objective",
        mode: str = "max",
        seed: int = 0,
        init_trials: int | None = None,
        name: str = "hpc-reid",
        snapshot_path: str | Path | None = None,
        max_rejections: int = 50,
    ):
        super().__init__(metric=metric, mode=mode)
        self.space = space
        self.snapshot_path = Path(snapshot_path) if snapshot_path else None
        self.max_rejections = max_rejections
        self.seed = seed
        self.trial_index: dict[str, int] = {}  # Ray trial id -> Ax trial index
        self._attached: dict[str, int] = {}  # Ray trial id -> last progression attached
        self._client = self._new_client(name, seed, init_trials)

    def _new_client(self, name: str, seed: int, init_trials: int | None):
        from ax import Client

        client = Client(random_seed=seed)
        client.configure_experiment(
            parameters=self.space.ax_parameters(),
            parameter_constraints=self.space.ax_constraints(),
            name=name,
        )
        sign = "" if self.mode == "max" else "-"
        client.configure_optimization(objective=f"{sign}{self.metric}")
        client.configure_generation_strategy(
            initialization_budget=init_trials, initialization_random_seed=seed
        )
        return client

    @property
    def client(self):
        """The ``ax.Client`` (for analysis: ``summarize()``, ``get_best_parameterization()``)."""
        return self._client

    # ------------------------------------------------------------------ Tune's Searcher API

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        # the space comes from the space file, not from Tune's param_space
        return not config and metric in (None, self.metric) and mode in (None, self.mode)

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        from ax.exceptions.core import DataRequiredError

        for _ in range(self.max_rejections):
            try:
                trials = self._client.get_next_trials(max_trials=1)
            except DataRequiredError:
                return None  # Ax waits for running trials' data; Tune asks again later
            if not trials:
                return None
            ((index, params),) = trials.items()
            broken = self.space.violated(params)
            if not broken:
                self.trial_index[trial_id] = index
                return dict(params)
            log.info("Ax trial %d breaks %s: abandoned, asking again", index, broken)
            self._client.mark_trial_abandoned(index)
        raise SearchError(
            f"{self.max_rejections} suggestions in a row break the constraints of "
            f"{self.space.source}; are they satisfiable?"
        )

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        self._attach(trial_id, result)

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        index = self.trial_index.get(trial_id)
        if index is None:
            return
        attached = self._attach(trial_id, result or {})
        if error:
            self._client.mark_trial_failed(index, failed_reason="the Ray Tune trial raised")
        elif result and result.get("final"):
            self._client.complete_trial(index)
        elif attached:
            # stopped by the scheduler (ASHA) before the last epoch: its data stays usable
            self._client.mark_trial_early_stopped(index)
        else:
            self._client.mark_trial_abandoned(index)
        if self.snapshot_path is not None:
            self.save_experiment(self.snapshot_path)

    def _attach(self, trial_id: str, result: dict[str, Any]) -> bool:
        """Attach the result's metrics at its step; True if the trial has any data in Ax."""
        index = self.trial_index.get(trial_id)
        value = result.get(self.metric)
        if index is None or value is None or not math.isfinite(value) or "step" not in result:
            return trial_id in self._attached
        step = int(result["step"])
        if self._attached.get(trial_id) != step:
            # only the objective: Ax fits a model to every metric it holds (mAP and rank-1 as
            # tracking metrics would triple the fitting time); they are in results.csv
            self._client.attach_data(index, {self.metric: float(value)}, progression=step)
            self._attached[trial_id] = step
        return True

    # ------------------------------------------------------------------ state

    def save_experiment(self, path: str | Path) -> Path:
        """Ax's own JSON snapshot (``Client.load_from_json_file`` reads it back)."""
        return write_atomic(path, json.dumps(self._snapshot()))

    def _snapshot(self) -> dict[str, Any]:
        fd, tmp = tempfile.mkstemp(suffix=".json")
        os.close(fd)
        try:
            self._client.save_to_json_file(tmp)
            return json.loads(Path(tmp).read_text())
        finally:
            os.unlink(tmp)

    def _client_from(self, snapshot: dict[str, Any]):
        from ax import Client

        fd, tmp = tempfile.mkstemp(suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(snapshot, f)
            client = Client.load_from_json_file(tmp)
        finally:
            os.unlink(tmp)
        # Ax's snapshot leaves out the client's seed (Ax 1.3.1): set it again, so a resumed
        # search draws its next suggestions as the uninterrupted one would
        client._random_seed = self.seed
        return client

    def get_state(self) -> dict[str, Any]:
        return {
            "ax_client": self._snapshot(),
            "trial_index": dict(self.trial_index),
            "attached": dict(self._attached),
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._client = self._client_from(state["ax_client"])
        self.trial_index = dict(state["trial_index"])
        self._attached = dict(state["attached"])

    def save(self, checkpoint_path: str) -> None:
        # Tune writes this next to its experiment state, to a temporary name then renames it
        Path(checkpoint_path).write_text(json.dumps(self.get_state()))

    def restore(self, checkpoint_path: str) -> None:
        self.set_state(json.loads(Path(checkpoint_path).read_text()))

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles the searcher into its tuner state: carry Ax as its JSON snapshot
        state = {k: v for k, v in self.__dict__.items() if k != "_client"}
        state["_client_snapshot"] = self._snapshot()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        snapshot = state.pop("_client_snapshot")
        self.__dict__.update(state)
        self._client = self._client_from(snapshot)
