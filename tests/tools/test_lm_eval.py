"""lm-evaluation-harness on kha-train checkpoints (kha_train/tools/lm_eval_model.py): the three
request types equal direct forwards of the model, lm-eval's `hf` backend on the exported model
gives the same answers on the local tasks in lm_eval_tasks/, the registered ``--model kha-train``
name works from the command line, and bad model_args get one clear error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")  # the `eval` extra

from lm_eval.api.instance import Instance  # noqa: E402
from model_helpers import TINY_MODEL_YAML  # noqa: E402

from kha_train.config import ConfigError, load_config  # noqa: E402
from kha_train.model import Transformer  # noqa: E402
from kha_train.tools.lm_eval_hook import PTH_FILE, PTH_LINE, install_pth  # noqa: E402
from kha_train.tools.lm_eval_model import MODEL_NAME, TARGET, KhaTrainLM  # noqa: E402

TASKS = Path(__file__).with_name("lm_eval_tasks")
ALL_TASKS = ["kha_tiny_mc", "kha_tiny_rolling", "kha_tiny_gen"]
SEQ_LEN = 32  # the model's context: some task documents need several rolling windows
MODEL_YAML = """
name: lm-eval-test
data:
  dataset: {dataset}
  seq_len: 32
train:
  micro_batch_size: 2
  global_batch_tokens: 64
  max_steps: 1
""" + TINY_MODEL_YAML.replace(
    "  attn_backend: math\n",
    "  attn_backend: math\n  tie_embeddings: false  # a tied random model mostly repeats its last token\n",
)
# fp32 sums over a few hundred features: the same function batched or padded differently
# agrees to about 1e-6 per token (tests/model/model_helpers.py); a sum over ~100 tokens of
# log-probabilities of order 5 then to ~1e-4.
TOL = dict(rel=1e-5, abs=1e-4)
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module", autouse=True)
def one_thread_offline():
    """One intra-op thread (tiny forwards on a shared 2-core machine are much faster so), and
    lm-eval / transformers / datasets kept off the network."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    old = {k: os.environ.get(k) for k in OFFLINE}
    os.environ.update(OFFLINE)
    yield
    torch.set_num_threads(threads)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A tokenizer, a prepared dataset (its index.json gives the export its EOS id), a random
    model with KHA-MLP and a router bias (so the remote-code class is exported), saved as a run
    directory with a DCP checkpoint, as a weights file, and exported in fp32."""
    from pydoc_data.topics import topics

    import torch.distributed.checkpoint as dcp

    from kha_train.data.prepare import PrepareOptions, prepare_dataset
    from kha_train.data.sources import SourceSpec
    from kha_train.data.tokenizer import save_tokenizer, train_tokenizer
    from kha_train.tools.export import export_hf
    from kha_train.tools.weights_io import save_weights
    from kha_train.training.checkpoint_checks import MARKER, write_manifest

    root = tmp_path_factory.mktemp("lm_eval")
    paragraphs = [p.strip() for n in sorted(topics) for p in topics[n].split("\n\n")]
    texts = [p for p in paragraphs if len(p) > 40][:200]
    tok = save_tokenizer(
        train_tokenizer(texts, 300), root / "tok" / "tokenizer.json",
        eos_token="<|endoftext|>", pad_token=None,
    )  # fmt: skip
    src = root / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:40]))
    opts = PrepareOptions(out=str(root / "data"), tokenizer=str(tok), val_fraction=0.2,
                          progress=False, num_proc=1)  # fmt: skip
    prepare_dataset(SourceSpec(spec=str(src)), opts)
    config = root / "run.yaml"
    config.write_text(MODEL_YAML.format(dataset=root / "data"))
    cfg = load_config(config)
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    model.init_weights()
    with torch.no_grad():  # away from init, so that KHA, the norms and the bias all matter
        for name, p in model.named_parameters():
            if any(s in name for s in ("norm", "kha_")):
                p.add_(0.2 * torch.randn_like(p))
        for block in model.layers:
            if block.is_moe:
                block.ffn.expert_bias.copy_(0.3 * torch.randn(cfg.model.moe.num_experts))
    model.eval()
    weights = save_weights(model, root / "model.safetensors")
    run = root / "run"
    ckpt = run / "checkpoints" / "step_0000005"
    with warnings.catch_warnings():  # "no process group: saving in a single process": yes
        warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
        dcp.save({"model": model.state_dict()}, checkpoint_id=str(ckpt))
    for where in (ckpt, run):
        (where / "config.yaml").write_text(config.read_text())
    write_manifest(ckpt)
    (ckpt / MARKER).write_text("")
    hf = root / "hf"
    export_hf(model, hf, dtype=torch.float32, run_cfg=cfg)
    return dict(root=root, tok=tok, config=config, model=model, weights=weights, run=run,
                ckpt=ckpt, hf=hf)  # fmt: skip


@pytest.fixture(scope="module")
def lm(world) -> KhaTrainLM:
    # batch_size 3: requests of different lengths share padded forwards
    return KhaTrainLM(path=str(world["run"]), device="cpu", batch_size=3)


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def _logprobs(model: Transformer, ids: list[int]) -> torch.Tensor:
    """Log-probabilities [len(ids), V] after each prefix of ``ids``, one forward (fp32)."""
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float().log_softmax(-1)


# -- the request types against direct forwards -------------------------------------------------


def test_loglikelihood_equals_a_direct_forward(world, lm) -> None:
    from kha_train.data.tokenizer import load_tokenizer

    tok, model = load_tokenizer(world["tok"]), world["model"]
    long_ctx = "The import statement finds a module, loads it, and binds a name to it. " * 3
    pairs = [
        ("Question: Which keyword defines a function?\nAnswer:", " def"),
        ("Question: Which keyword defines a function?\nAnswer:", " class statement"),
        ("A trailing space moves to the continuation: ", "yes"),
        ("", "An empty context is the EOS token."),
        (long_ctx, " and the rest"),  # longer than max_length: the last tokens are kept
    ]
    assert len(tok.encode(long_ctx)) > SEQ_LEN
    got = lm.loglikelihood(_requests("loglikelihood", pairs))
    for (ctx, cont), (logprob, greedy) in zip(pairs, got):
        spaces = len(ctx) - len(ctx.rstrip())
        ctx, cont = ctx[: len(ctx) - spaces], ctx[len(ctx) - spaces :] + cont
        ctx_ids = tok.encode(ctx) if ctx else [tok.eos_id]
        whole = ctx_ids + tok.encode(ctx + cont)[len(tok.encode(ctx)) :]
        n = len(whole) - len(ctx_ids)
        seq = whole[-(SEQ_LEN + 1) :]
        rows = _logprobs(model, seq[:-1])[-n:]
        target = torch.tensor(seq[-n:])
        want = rows.gather(-1, target[:, None]).sum().item()
        assert logprob == pytest.approx(want, **TOL)
        assert greedy == bool((rows.argmax(-1) == target).all())
    # Token level: the model's own argmax continuation is greedy, the runner-up is not.
    ctx_ids = tok.encode("Which statement leaves a loop")
    first, second = _logprobs(model, ctx_ids)[-1].topk(2).indices.tolist()
    then = int(_logprobs(model, [*ctx_ids, first])[-1].argmax())
    scored = lm._loglikelihood_tokens(
        [(None, ctx_ids, [first, then]), (None, ctx_ids, [second]), (None, ctx_ids, [first])]
    )
    assert [greedy for _, greedy in scored] == [True, False, True]


def test_rolling_loglikelihood_scores_every_token_once_in_windows(world, lm) -> None:
    """Token t of a text: after EOS and all tokens before it while it is in the first window
    of max_length, later from the last max_length tokens before the end of its window."""
    from kha_train.data.tokenizer import load_tokenizer

    tok, model = load_tokenizer(world["tok"]), world["model"]
    texts = [
        "Short text.",
        "The global statement is a declaration which holds for the entire current code block. "
        "It means that the listed identifiers are to be interpreted as globals.",
        "",
    ]
    got = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(t,) for t in texts]))
    for text, logprob in zip(texts, got):
        ids = tok.encode(text)
        want = 0.0
        for t in range(len(ids)):
            if t < SEQ_LEN:
                context = [tok.eos_id, *ids[:t]]
            else:
                end = min((t // SEQ_LEN + 1) * SEQ_LEN, len(ids))  # the window scoring t
                context = ids[end - SEQ_LEN - 1 : t]
            want += _logprobs(model, context)[-1, ids[t]].item()
        assert logprob == pytest.approx(want, **TOL), text
    assert len(tok.encode(texts[1])) > 2 * SEQ_LEN  # three windows
    assert got[2] == 0.0


def test_generate_until_is_greedy_decoding_cut_at_the_stop_strings(world, lm) -> None:
    from kha_train.data.tokenizer import load_tokenizer

    tok, model = load_tokenizer(world["tok"]), world["model"]
    prompts = ["The import statement", "A", "Exceptions are handled in a try statement by"]

    def greedy(prompt: str, n: int) -> str:
        seq = tok.encode(prompt)
        new: list[int] = []
        for _ in range(n):
            nxt = int(_logprobs(model, seq)[-1].argmax())
            if nxt == tok.eos_id:
                break
            seq.append(nxt)
            new.append(nxt)
        return tok.tokenizer.decode(new, skip_special_tokens=True)

    full = [greedy(p, 12) for p in prompts]
    # A stop string taken from the middle of the first prompt's own greedy text.
    stop = full[0][len(full[0]) // 2 :][:2]
    assert stop
    kwargs = {"until": [stop], "max_gen_toks": 12, "do_sample": False}
    got = lm.generate_until(_requests("generate_until", [(p, kwargs) for p in prompts]))
    assert got == [f.split(stop)[0] for f in full]
    assert got[0] != full[0]  # it was cut
    # Decoding ends once every sequence holds a stop string: fewer forwards than max_gen_toks.
    forwards: list[int] = []
    hook = lm.model.embed_tokens.register_forward_hook(lambda m, i, o: forwards.append(1))
    try:
        lm.generate_until(_requests("generate_until", [(prompts[0], kwargs)]))
    finally:
        hook.remove()
    assert len(forwards) < kwargs["max_gen_toks"]
    short = {"until": [], "max_gen_toks": 3}
    assert lm.generate_until(_requests("generate_until", [(prompts[1], short)])) == [
        greedy(prompts[1], 3)
    ]


# -- lm-eval's evaluator, ours and the hf backend -----------------------------------------------


def _evaluate(model: str, model_args: dict, tasks: list[str]) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(
        model=model, model_args=model_args, tasks=tasks, device="cpu", batch_size=1,
        task_manager=TaskManager(include_path=str(TASKS), include_defaults=False),
        bootstrap_iters=0, log_samples=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def both(world) -> tuple[dict, dict]:
    """The three local tasks under ``--model kha-train`` (by its registered name, on the run
    directory) and under lm-eval's ``hf`` backend on the fp32 export."""
    ours = _evaluate(MODEL_NAME, {"path": str(world["run"])}, ALL_TASKS)
    hf = _evaluate(
        "hf", {"pretrained": str(world["hf"]), "trust_remote_code": True, "dtype": "float32"},
        ALL_TASKS,
    )  # fmt: skip
    return ours, hf


def test_hf_backend_on_the_export_gives_the_same_results(both) -> None:
    ours, hf = both
    mc_ours, mc_hf = ours["results"]["kha_tiny_mc"], hf["results"]["kha_tiny_mc"]
    print("kha-train:", {t: ours["results"][t] for t in ALL_TASKS})
    print("hf:       ", {t: hf["results"][t] for t in ALL_TASKS})
    assert mc_ours["acc,none"] == mc_hf["acc,none"]
    assert mc_ours["acc_norm,none"] == mc_hf["acc_norm,none"]
    for task in ALL_TASKS:
        a, b = ours["samples"][task], hf["samples"][task]
        assert len(a) == len(b) == 12
        for x, y in zip(a, b):
            assert x["doc_id"] == y["doc_id"]
            if task == "kha_tiny_gen":  # generated text
                assert x["filtered_resps"] == y["filtered_resps"]
                continue
            # [(loglikelihood, is_greedy)] per choice; rolling: [loglikelihood]
            lx = [r[0] if isinstance(r, list | tuple) else r for r in x["filtered_resps"]]
            ly = [r[0] if isinstance(r, list | tuple) else r for r in y["filtered_resps"]]
            assert [float(v) for v in lx] == pytest.approx([float(v) for v in ly], **TOL)
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        r_ours, r_hf = ours["results"]["kha_tiny_rolling"], hf["results"]["kha_tiny_rolling"]
        assert r_ours[metric] == pytest.approx(r_hf[metric], rel=1e-5)
    assert (
        ours["results"]["kha_tiny_gen"]["exact_match,none"]
        == (hf["results"]["kha_tiny_gen"]["exact_match,none"])
    )
    info = ours["config"]
    assert info["kha_train_checkpoint"].endswith("step_0000005") and info["kha_train_step"] == 5


@pytest.mark.slow
def test_the_plain_lm_eval_command_finds_the_model(world, both, tmp_path) -> None:
    """As a user runs it: lm-eval's own `lm_eval` script, ``--model kha-train --model_args
    path=...`` on a weights file + config (kha_train_lm_eval.pth registers the name: make setup
    installs it into the virtualenv, a regular install of the package brings it)."""
    import sysconfig

    pth = Path(sysconfig.get_paths()["purelib"]) / PTH_FILE
    assert pth.is_file(), f"{pth} is missing: run `make setup` (or install_pth())"
    out = tmp_path / "out"
    lm_eval_script = Path(sys.executable).with_name("lm_eval")
    args = [str(lm_eval_script), "--model", MODEL_NAME,
            "--model_args", f"path={world['weights']},config={world['config']}",
            "--tasks", "kha_tiny_mc", "--include_path", str(TASKS), "--device", "cpu",
            "--batch_size", "auto", "--output_path", str(out)]  # fmt: skip
    env = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [result] = out.rglob("results_*.json")
    acc = json.loads(result.read_text())["results"]["kha_tiny_mc"]["acc,none"]
    assert acc == both[0]["results"]["kha_tiny_mc"]["acc,none"]
    assert "kha_tiny_mc" in proc.stdout and "acc" in proc.stdout  # lm-eval's table


def test_the_startup_hook_adds_kha_train_beside_lm_evals_models(tmp_path) -> None:
    """The .pth line, processed as Python processes a site directory: after `lm_eval.models` is
    imported, `kha-train` resolves to our class and lm-eval's own `hf` is still there; with
    KHA_TRAIN_NO_LM_EVAL_HOOK=1 the registry is lm-eval's alone; setup.py writes the same line."""
    repo = Path(__file__).resolve().parents[2]
    install_pth(str(tmp_path))
    assert (tmp_path / PTH_FILE).read_text() == PTH_LINE
    assert f"PTH = {PTH_FILE!r}" in (repo / "setup.py").read_text().replace('"', "'")
    # -S: no site directory is processed (so not the virtualenv's own copy of the .pth); this
    # process's path is given by hand, then the test's folder is processed as a site directory.
    path = [p for p in sys.path if p]
    code = (
        f"import site, sys; sys.path += {path!r}; site.addsitedir({str(tmp_path)!r}); "
        "from lm_eval.api.registry import get_model, model_registry; import lm_eval.models; "
        "print('kha-train' in model_registry, 'hf' in model_registry); "
        "print(get_model('kha-train').__name__ if 'kha-train' in model_registry else '-')"
    )
    env = {**os.environ, **OFFLINE, "PYTHONPATH": str(repo)}
    env.pop("KHA_TRAIN_NO_LM_EVAL_HOOK", None)
    on = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                        env=env, timeout=120)  # fmt: skip
    assert on.returncode == 0, on.stderr[-2000:]
    assert on.stdout.split() == ["True", "True", "KhaTrainLM"]
    off = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                         env={**env, "KHA_TRAIN_NO_LM_EVAL_HOOK": "1"}, timeout=120)  # fmt: skip
    assert off.stdout.split() == ["False", "True", "-"]


def test_kha_train_lm_eval_hands_its_arguments_to_lm_eval(world, capsys) -> None:
    from kha_train.cli import main

    assert main(["lm-eval", "--model", MODEL_NAME, "--model_args", "path=/no/such/run"]) == 2
    assert "no such run directory" in capsys.readouterr().err


def test_the_command_line_gives_one_error_line_naming_the_fix(world, tmp_path, capsys) -> None:
    """Checked before lm-eval reads its task files: at once, one line, exit code 2."""
    from kha_train.tools.lm_eval_model import main

    base = ["--model", MODEL_NAME, "--tasks", "kha_tiny_mc", "--include_path", str(TASKS)]
    cases = [
        (f"path={tmp_path / 'nope'}", "no such run directory, checkpoint folder or weights"),
        (f"path={world['weights']}", f"path={world['weights']},config=RUN.yaml"),
        (f"path={world['run']},batch_size=8", "batch_size (give lm-eval's --batch_size)"),
    ]
    for model_args, message in cases:
        assert main([*base, "--model_args", model_args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_registration_keeps_lm_evals_own_models_and_declares_the_entry_point() -> None:
    from importlib.metadata import entry_points

    from lm_eval.api.registry import get_model

    assert get_model(MODEL_NAME) is KhaTrainLM
    assert get_model("hf").__name__ == "HFLM"  # the registry was not left without built-ins
    # What lm-eval's plugin discovery (after 0.4.13) reads: [project.entry-points."lm_eval.models"]
    [ep] = [e for e in entry_points(group="lm_eval.models") if e.name == MODEL_NAME]
    assert ep.value == TARGET and ep.load() is KhaTrainLM


# -- bad input -------------------------------------------------------------------------------


def test_bad_model_args_give_one_clear_error(world, tmp_path) -> None:
    cases = [
        ({}, "needs the model's path: --model_args path="),
        ({"path": str(tmp_path / "missing")}, "no such run directory"),
        ({"path": str(world["weights"])}, "is a weights file: add its run config"),
        ({"path": str(world["weights"]), "config": str(tmp_path / "no.yaml")}, "no such file"),
        ({"pretrained": "gpt2"}, "reads its checkpoint from path="),
        ({"path": str(world["run"]), "dtype": "float16"}, "use auto, fp32 or bf16"),
        ({"path": str(world["run"]), "batch_size": "big"}, "--batch_size big: give a number"),
        ({"path": str(world["run"]), "max_length": 0}, "max_length=0: give an integer >= 2"),
        ({"path": str(world["run"]), "tokenizer": str(tmp_path / "t.json")}, "no such file"),
        (
            {"path": str(tmp_path)},
            "a folder without a complete checkpoint",
        ),  # a folder without checkpoints
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("+", r"\+")):
            KhaTrainLM(**kwargs)
    lm = KhaTrainLM(path=str(world["ckpt"]), device="cpu", max_length=8)
    with pytest.raises(ConfigError, match="leaves no room for a prompt"):
        lm.generate_until(_requests("generate_until", [("x", {"max_gen_toks": 8})]))
