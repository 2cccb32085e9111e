"""Whether the base model fits the data (results' `model_fit`, checked by eval/fit.py): a warning
before every number when it does not, since chance-level leakage from a model that learned nothing
is not privacy; one sentence when it does."""

from __future__ import annotations

from fedleak.reports.document import Section, fmt
from fedleak.reports.merge import Merged


def fit_section(run: Merged) -> Section | None:
    """The model-fit warnings (None for a results file written before fedleak-results/7)."""
    fit = run.results.get("model_fit")
    if not fit:
        return None
    numbers = (f"held-out perplexity {fmt(fit.get('base_perplexity'), 1)} for the base model and "
               f"{fmt(fit.get('best_trained_perplexity'), 1)} at best after training"
               + (f" ({fit['best_trained_view']})" if fit.get("best_trained_view") else ""))
    if fit["fits"]:
        return Section("Model fit", [
            f"The base model fits the data: {numbers}, below utility.fit_perplexity = {fmt(fit['fit_perplexity'], 0)}; "
            f"answers are not cut short at federation.max_length, and self-generation (if any) stayed in the domain."])
    return Section("Warning: the model does not fit the data", [
        "Read every number below with this in mind: an attack at chance on a model that learned nothing shows "
        "no privacy.", *[p["message"][0].upper() + p["message"][1:] + "." for p in fit["problems"]]])
