"""Without the optional reference libraries (jiwer, rouge-score, pycocoevalcap), `import spilleval` and every metric
that does not need them work, and a metric that needs one fails when it is built, naming the extra to install.

Real subprocesses in which those packages cannot be found: their `sys.modules` entries are None before anything is
imported (nltk and rapidfuzz too, which rouge-score and jiwer import), so imports fail and `importlib.util.find_spec`
finds nothing, as in an environment without them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO_ROOT

BLOCKED = ("jiwer", "rouge_score", "pycocoevalcap", "nltk", "rapidfuzz")
# None in sys.modules: `import jiwer` raises ModuleNotFoundError (name "jiwer") and importlib.util.find_spec("jiwer")
# returns None, as when the package is not installed (transformers probes optional packages with find_spec)
BLOCKER = f"""
import sys
for name in {BLOCKED!r}:
    sys.modules[name] = None
"""

SCRIPT = BLOCKER + textwrap.dedent("""
    import json, sys, tempfile
    import spilleval
    from spilleval import Evaluator, compute_from_spill
    from spilleval.batch import SampleBatch
    from spilleval.metrics import available_metrics, build_metric
    from spilleval.testing import build_tokenizer

    out = {"metrics": sorted(available_metrics())}
    tok = build_tokenizer()
    ids = tok.convert_tokens_to_ids(["red", "cat", "blue", "dog"])
    batch = SampleBatch.from_rows([0, 1], [ids[:2], ids[2:]], [ids[:2], ids[1:3]], vocab_size=len(tok),
                                  logprobs=[[-0.5, -1.0], [-2.0, -0.25]],
                                  columns={"refs": ["red cat", "blue dog"], "question_id": [0, 0],
                                           "choice_target": [True, False]})
    specs = ["token_accuracy", "text_match", "nll", "bits_per_byte", "mc_accuracy", "answer_macro_f1",
             *[{"name": n, "params": {"references_column": "refs"}} for n in ("bleu", "chrf", "ter", "squad", "cider")]]
    directory = tempfile.mkdtemp() + "/spill"
    evaluator = Evaluator(directory, specs, tokenizer=tok, dataset_length=2)
    evaluator.add(batch, vocab_size=len(tok))
    out["live"] = evaluator.finalize()
    out["offline"] = compute_from_spill(directory)
    out["errors"] = {}
    for name in ("wer", "cer", "mer", "wil", "wip", "rouge"):
        try:
            build_metric(name)
        except Exception as error:
            out["errors"][name] = [type(error).__name__, isinstance(error, ImportError), str(error)]
    out["imported"] = sorted(m for m, module in sys.modules.items()
                             if m.split(".")[0] in BLOCKED_NAMES and module is not None)
    out["directory"] = directory
    print(json.dumps(out))
""").replace("BLOCKED_NAMES", repr(BLOCKED))

EXTRA = {"wer": "asr", "cer": "asr", "mer": "asr", "wil": "asr", "wip": "asr", "rouge": "rouge"}
PACKAGE = {"asr": "jiwer", "rouge": "rouge-score"}  # cider needs nothing: pycocoevalcap is its test reference


def run_python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300, check=False)


@pytest.mark.slow
def test_metrics_work_without_the_optional_libraries_and_name_the_extra_when_needed():
    done = run_python(SCRIPT)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.splitlines()[-1])
    assert {"wer", "rouge", "cider", "mc_accuracy", "ter"} <= set(out["metrics"])  # registered all the same
    assert out["live"] == out["offline"] and out["live"]["token_accuracy"] == 0.5 and "ter" in out["live"]
    assert out["imported"] == []  # no blocked package was loaded after all
    for name, extra in EXTRA.items():
        kind, is_import_error, message = out["errors"][name]
        assert kind == "MissingDependencyError" and is_import_error
        assert f"metric {name!r} needs the {PACKAGE[extra]} package, which is not installed" in message
        assert f"pip install 'spilleval[{extra}]'" in message

    # the CLI says it in one line, exit code 2 (a user error), no traceback
    cli = BLOCKER + "import sys; from spilleval.cli import main; sys.argv[0] = 'spilleval'; main()"
    done = run_python(cli, "compute", out["directory"], "--metrics", "wer")
    assert done.returncode == 2, done.stderr[-3000:]
    assert "pip install 'spilleval[asr]'" in done.stderr + done.stdout
    assert "Traceback" not in done.stderr
