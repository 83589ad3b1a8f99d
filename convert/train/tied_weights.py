"""accelerate's notice about a tied output embedding, silenced where the tie is real.

accelerate's ``save_state`` writes safetensors, which cannot hold one storage twice, so it drops the
output embedding that shares the input embedding's storage (SmolLM2's ``lm_head.weight``) and logs
"Removed shared tensor ... check by verifying that you don't receive any warning while reloading" at
every checkpoint. Loading re-ties it (tests/test_uptrain.py::test_resume_is_exact[tied-embeddings]
resumes such a run to the same losses), so for that tensor the notice only asks a user to check
something checked. Any other shared tensor still gets it.
"""

from __future__ import annotations

import ast
import logging
import re
from contextlib import contextmanager
from typing import Iterator

ACCELERATE_LOGGER = "accelerate.utils.other"  # where accelerate's clean_state_dict_for_safetensors logs
_NOTICE = re.compile(r"Removed shared tensor (\{.*?\}) while saving")


def tied_output_names(model) -> set[str]:
    """State-dict names of the output embedding when it is the input embedding's very tensor, else none.

    ``model`` is what a checkpoint saves: a transformers model, or one wrapped by peft (LoRA) or DDP, whose
    state-dict names carry the wrapper's prefix (``base_model.model.``, ``module.``); the names come from
    the wrapper itself, so they are the saved ones."""
    from accelerate.utils import extract_model_from_parallel

    base = extract_model_from_parallel(model)
    if hasattr(base, "get_base_model"):  # peft
        base = base.get_base_model()
    out, inp = base.get_output_embeddings(), base.get_input_embeddings()
    if out is None or inp is None or out.weight is not inp.weight:
        return set()
    return {f"{name}.weight" for name, m in model.named_modules(remove_duplicate=False) if m is out}


class _DropTiedNotice(logging.Filter):
    def __init__(self, names: set[str]):
        super().__init__()
        self.names = names

    def filter(self, record: logging.LogRecord) -> bool:
        m = _NOTICE.search(record.getMessage())
        if not m:
            return True
        try:
            removed = ast.literal_eval(m.group(1))
        except (ValueError, SyntaxError):
            return True
        return not (isinstance(removed, set) and removed and removed <= self.names)


@contextmanager
def quiet_tied_notice(names: set[str]) -> Iterator[None]:
    """Within the block, accelerate's notice is dropped when every tensor it names is in ``names``."""
    logger = logging.getLogger(ACCELERATE_LOGGER)
    f = _DropTiedNotice(set(names))
    logger.addFilter(f)
    try:
        yield
    finally:
        logger.removeFilter(f)
