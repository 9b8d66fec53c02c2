"""Early stopping of clearly worse trials: Wilcoxon over paired requests, with a margin."""

from __future__ import annotations

from typing import Any


def make_pruner(margin: float = 0.02, p_threshold: float = 0.1, n_startup_steps: int = 3) -> Any:
    """A WilcoxonPruner that only prunes a trial whose mean so far is also worse than the best
    trial's mean at the same steps by more than ``margin`` (relative).

    Steps are request positions in the fixed workload, so the same prompt is compared with
    the same prompt; the margin keeps run-to-run noise from pruning a near-tie.
    """
    import optuna

    class MarginWilcoxonPruner(optuna.pruners.BasePruner):
        def __init__(self) -> None:
            self._wilcoxon = optuna.pruners.WilcoxonPruner(
                p_threshold=p_threshold, n_startup_steps=n_startup_steps
            )

        def prune(self, study: Any, trial: Any) -> bool:
            values = trial.intermediate_values
            if len(values) < n_startup_steps:
                return False
            try:
                best = study.best_trial
            except ValueError:
                return False
            common = [s for s in values if s in best.intermediate_values]
            if not common:
                return False
            mine = sum(values[s] for s in common) / len(common)
            theirs = sum(best.intermediate_values[s] for s in common) / len(common)
            maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
            worse = mine < theirs * (1 - margin) if maximize else mine > theirs * (1 + margin)
            return bool(worse and self._wilcoxon.prune(study, trial))

    return MarginWilcoxonPruner()
