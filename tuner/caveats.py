"""What makes a study's result less certain than its numbers look: one list, built once.

Every view shows the same list: the terminal summary, ``--json`` (``warnings``), the report's
first screen. Each caveat has a stable ``code`` for scripts and a sentence that says what to do.
Read side only: built from the stored study (``results.StoredStudy``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from tuner import results
from tuner.gains import ContextChange, context_change
from tuner.memory import fit_of
from tuner.record import TrialRecord

if TYPE_CHECKING:
    from tuner.results import StoredStudy

#: The codes, one per kind of caveat.
CONTENDED = "contended"
NO_INTERVAL = "no_interval"
NO_BASELINE = "no_baseline"
CONTEXT_LOWERED = "context_lowered"
LOW_HEADROOM = "low_headroom"
SINGLE_MEASUREMENT = "single_measurement"
#: Warnings of the run itself (tuner/study.py ``prepare``), by how their text begins.
NO_GPU_TELEMETRY = "no_gpu_telemetry"
CPU_EXTRA_BUFFERS = "cpu_extra_buffers"
PRUNING_WEAK = "pruning_weak"
RUN = "run"
_RUN_PREFIXES = (("no NVIDIA GPU telemetry", NO_GPU_TELEMETRY), ("llama.cpp's AMX", CPU_EXTRA_BUFFERS),
                 ("pruning needs", PRUNING_WEAK))


@dataclass(frozen=True)
class Caveat:
    """One caveat: a stable ``code`` and a sentence with what to do; ``detail`` holds its numbers."""

    code: str
    text: str
    detail: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` form: ``{"code", "text"}``, with ``detail`` when it has any."""
        return {"code": self.code, "text": self.text, **({"detail": dict(self.detail)} if self.detail else {})}


def run_caveat(text: str) -> Caveat:
    """A warning the run printed before measuring (no GPU telemetry, ...), with its code."""
    code = next((c for prefix, c in _RUN_PREFIXES if text.startswith(prefix)), RUN)
    return Caveat(code, text)


def context_lowered(st: StoredStudy, r: TrialRecord) -> ContextChange | None:
    """The context ``r`` gives up against the server's default for this model (the baseline's),
    with what lowering it measured in the ablation; None when it gives up none."""
    return context_change(r, st.baseline(), st.ablation)


def _contended(st: StoredStudy) -> Caveat | None:
    trials, redone, lost_s = st.contention()
    if not trials:
        return None
    detail = {"trials": trials, "redone": redone, "lost_s": round(lost_s, 1), "only_contended": st.only_contended}
    if st.only_contended:
        return Caveat(CONTENDED, "every feasible trial was measured while other processes competed for the machine: "
                                 "the winner above is uncertain; re-run when the machine is quiet", detail)
    return Caveat(CONTENDED, f"{trials} trial{'s' if trials != 1 else ''} measured while other processes competed "
                             "for the machine: left out of the winner, their numbers are not to rely on; re-run "
                             "when the machine is quiet to measure them again", detail)


def _speedup(st: StoredStudy, best: TrialRecord) -> Caveat | None:
    w = st.winner_speedup(best)
    if isinstance(w, results.SearchSpeedup):
        why, todo = results.NO_INTERVAL_TEXT[w.no_interval]
        return Caveat(NO_INTERVAL, f"the speedup over the defaults has no interval: {why}; {todo}",
                      {"reason": w.no_interval})
    if isinstance(w, results.NoSpeedup) and w.reason == results.NO_BASELINE:
        return Caveat(NO_BASELINE, "the study has no baseline trial (--no-baseline), so there is no speedup over "
                                   "the defaults: a new study without that option measures the defaults first")
    return None


def _revalidated(st: StoredStudy, r: TrialRecord) -> bool:
    """``r`` was re-measured in at least two counted rounds."""
    val = st.validation
    if val is None:
        return False
    entries = [*val.entries, *([val.baseline] if val.baseline is not None else [])]
    return any(e.number == r.number and not e.error and len(e.values) >= 2 for e in entries)


def _single(st: StoredStudy, best: TrialRecord) -> Caveat | None:
    repeats = (st.info.workload or {}).get("repeats")
    if repeats != 1 or _revalidated(st, best):
        return None
    return Caveat(SINGLE_MEASUREMENT, f"the winner (#{best.number}) was measured once (--repeats 1) and not "
                                      "re-validated: one lucky request can make a winner; --repeats 3 or --validate 2 "
                                      "measures it again", {"trial": best.number, "repeats": 1})


def study_caveats(st: StoredStudy, best: TrialRecord | None = None) -> list[Caveat]:
    """The caveats of a stored study whose feasible winner is ``best`` (None: nothing feasible,
    then only those of the study as a whole)."""
    out = [run_caveat(w) for w in st.info.run_warnings]
    out += [c for c in [_contended(st)] if c is not None]
    if best is None:
        return out
    speedup = _speedup(st, best)
    if speedup is not None:
        out.append(speedup)
    lowered = context_lowered(st, best)
    if lowered is not None:
        r = lowered.effect.reverted if lowered.effect is not None else None
        out.append(Caveat(CONTEXT_LOWERED, "the winner's " + "; ".join(lowered.lines()),
                          {"num_ctx": lowered.value, "default_num_ctx": lowered.default,
                           **({"gain": r.to_dict()} if r is not None else {})}))
    fit = fit_of(best, st.attrs, st.records)
    if fit is not None and fit.tight:
        out.append(Caveat(LOW_HEADROOM,
                          f"less than {fit.headroom_mib:,.0f} MiB of GPU memory to spare: another program that takes "
                          "a little GPU memory would make this config fail to load (--vram-headroom-mib sets the "
                          "margin)", {"spare_at_most_mib": fit.spare_mib, "headroom_mib": fit.headroom_mib}))
    single = _single(st, best)
    if single is not None:
        out.append(single)
    return out


def all_caveats(run_warnings: Iterable[str], caveats: Iterable[Caveat]) -> list[Caveat]:
    """The run's own warnings (coded), then the study's caveats (which hold the stored warnings
    of the latest run: each said once)."""
    caveats = list(caveats)
    said = {c.text for c in caveats}
    return [*(run_caveat(w) for w in run_warnings if w not in said), *caveats]
