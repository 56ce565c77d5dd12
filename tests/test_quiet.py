"""Quiet by default: `modes` commands print no torchao, pytree, Dynamo or transformers chatter
unless -v; the library's own warnings (message "modes: ...") always show."""
import logging
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

from modes_fx.quiet import QUIET_LOGGERS, quiet_third_party
from modes_fx.harness.testing import build, calibration_items

# a line printed by torchao's logger, torch's Dynamo / Inductor / pytree loggers, transformers'
# logger, or a Python warning raised in those packages (the library's own warnings may name them)
THIRD_PARTY = re.compile(
    r"^(?:[A-Z]+:torchao|[DIWE]\d{4} .*torch/(?:_dynamo|_inductor|utils/_pytree)|\[transformers\]"
    r"|\S*site-packages/(?:torch|torchao|transformers)/\S+:\d+: \w+).*$",
    re.MULTILINE,
)


def test_calibrate_command_prints_no_third_party_lines_unless_verbose(tmp_path):
    """Fresh processes, so torchao's import-time messages and Dynamo's graph-break dump (the VLM's
    image-placeholder check calls Tensor.item()) happen in them: absent by default, there with -v."""
    model = build("qwen3_vl_moe")
    model.save_pretrained(tmp_path / "model")
    torch.save(calibration_items(model, batches=1), tmp_path / "data.pt")
    outputs = {}
    for flags in ([], ["-v"]):
        argv = [sys.executable, "-m", "modes_fx.cli", *flags, "calibrate", "--model", str(tmp_path / "model"),
                "--data", str(tmp_path / "data.pt"), "--target-skip", "0.5", "--points", "6",
                "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "s.json")]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-3000:]
        outputs[bool(flags)] = done.stdout + done.stderr
    assert THIRD_PARTY.findall(outputs[False]) == [], outputs[False]
    assert "saved" in outputs[False] and "skip ratio" in outputs[False]
    verbose = THIRD_PARTY.findall(outputs[True])  # the pattern does see them
    for source in ("WARNING:torchao", "torch/utils/_pytree.py", "torch/_dynamo/"):
        assert any(source in line for line in verbose), (source, outputs[True])


def test_quiet_hides_third_party_loggers_and_warnings_but_not_the_librarys(recwarn):
    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    with quiet_third_party(verbose=False):
        for name in ("torchao", "torch.utils._pytree", "torch._dynamo.variables.tensor", "transformers.utils.generic"):
            assert not logging.getLogger(name).isEnabledFor(logging.WARNING), name
        assert logging.getLogger("transformers.utils.loading_report").isEnabledFor(logging.WARNING)  # missing weights
        assert logging.getLogger("modes_fx").isEnabledFor(logging.WARNING)
        warnings.warn_explicit("`past_key_values` is deprecated", FutureWarning, "generic.py", 1, module="transformers.utils.generic")
        warnings.warn_explicit("graph break", UserWarning, "tensor.py", 1, module="torch._dynamo.variables.tensor")
        warnings.warn_explicit("modes: 4 of 4 MoE layers ran dense", UserWarning, "tensor.py", 2, module="torch._dynamo.eval_frame")
        warnings.warn_explicit("modes: deprecated", FutureWarning, "generic.py", 2, module="transformers.utils.generic")
    assert [str(w.message) for w in recwarn] == ["modes: 4 of 4 MoE layers ran dense", "modes: deprecated"]
    assert {name: logging.getLogger(name).level for name in QUIET_LOGGERS} == levels  # restored


def test_verbose_changes_nothing(recwarn):
    with quiet_third_party(verbose=True):
        assert logging.getLogger("torch._dynamo").isEnabledFor(logging.WARNING)
        assert logging.getLogger("torchao").isEnabledFor(logging.WARNING)
        warnings.warn_explicit("graph break", UserWarning, "tensor.py", 3, module="torch._dynamo.variables.tensor")
    assert [str(w.message) for w in recwarn] == ["graph break"]


@pytest.mark.parametrize("variable", ["TORCH_LOGS", "TRANSFORMERS_VERBOSITY"])
def test_users_logging_environment_is_respected(monkeypatch, variable):
    monkeypatch.setenv(variable, "+dynamo" if variable == "TORCH_LOGS" else "info")
    with quiet_third_party(verbose=False):
        kept = "torch._dynamo" if variable == "TORCH_LOGS" else "transformers"
        assert logging.getLogger(kept).level != logging.ERROR
        assert not logging.getLogger("torchao").isEnabledFor(logging.WARNING)
