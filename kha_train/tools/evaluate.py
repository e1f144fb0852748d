"""`kha-train eval`: held-out loss, perplexity and bits per byte of a trained model.

The model comes from a run directory (its newest complete checkpoint), a trainer checkpoint
folder, or a weights file with ``--config`` (tools/weights_io.py). Text comes from the run's own
val split, prepared datasets (``--data``) and raw text files (``--source NAME=PATH``, tokenized
here with the run's tokenizer). docs/evaluation.md describes the command and the JSON it writes.

Scoring. Every document is scored alone, laid out as in prepared data (its tokens, then EOS):
the first token has no prediction, every later token and the final EOS is predicted from its
prefix (``--score-first`` puts an EOS in front, the boundary the model saw in packed training,
so the first token is predicted too). A document longer than the window (``data.seq_len``) is
read by a sliding window: windows of ``window`` tokens, each ``stride`` tokens after the last,
the last one ending at the document's end; each token is scored once, by the first window that
reaches it, with between ``window - stride`` and ``window - 1`` tokens of left context.
Windows of many documents are batched (padded on the right; attention is causal and MoE routing
per token, so padding changes nothing before it) and the NLL is taken in fp32 from the logits.

Bits per byte = total NLL (nats) / (ln 2 x UTF-8 bytes of the text the scored tokens spell): the
whole document, minus the first token's text when that token is not scored. It divides by the
text, not by tokens, so models with different tokenizers compare on the same text.

Only torch-free modules are imported at the top: the CLI imports this module for
:func:`add_eval_arguments` when it builds its parser.
"""

from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kha_train.tools.args import add_device_argument, add_source_arguments
from kha_train.tools.eval_report import SourceResult, build_report, print_report, write_json

if TYPE_CHECKING:
    import torch

    from kha_train.config import Config
    from kha_train.data.documents import Document
    from kha_train.data.shards import DatasetIndex
    from kha_train.data.tokenizer import LoadedTokenizer

RUN_VAL = "val"  # the name of the run's own val split in the results


# -- the command line ------------------------------------------------------------------------


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``kha-train eval`` (the command is registered by tools/commands.py)."""
    add_source_arguments(parser, dest="checkpoint", metavar="RUN_OR_CHECKPOINT")
    parser.add_argument(
        "--source",
        dest="sources",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="raw text to score, tokenized with the run's tokenizer (repeatable): .txt, .jsonl, "
        ".json, .parquet (optionally .gz), a folder, a glob, or several joined by commas",
    )
    parser.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="[NAME=]DIR",
        help="a prepared dataset (`kha-train data prepare --out DIR`) to score, its --split "
        "(repeatable; NAME defaults to DIR's name and the split)",
    )
    parser.add_argument(
        "--split",
        choices=["val", "train"],
        default="val",
        help="split of the --data datasets (default val)",
    )
    parser.add_argument(
        "--no-val",
        action="store_true",
        help="skip the run's own val split (data.dataset), scored by default",
    )
    parser.add_argument(
        "--text-field", default="text", help="column of .jsonl / .parquet sources (default text)"
    )
    parser.add_argument(
        "--txt-sample-by",
        choices=["document", "paragraph", "line"],
        default="document",
        help=".txt sources: one document per file, paragraph or line (default document)",
    )
    parser.add_argument(
        "--tokenizer",
        help="the run's tokenizer.json, to tokenize --source text and decode prepared tokens "
        "for bits per byte (default: data.tokenizer, else the tokenizer.json of data.dataset)",
    )
    parser.add_argument(
        "--window",
        type=int,
        default=None,
        help="tokens the model reads at once (default data.seq_len, the training context)",
    )
    parser.add_argument(
        "--stride",
        type=int,
        default=None,
        help="tokens between sliding windows over a long document, in [1, window) "
        "(default window // 2); each token keeps at least window - stride tokens of context",
    )
    parser.add_argument(
        "--score-first",
        action="store_true",
        help="also score each document's first token, predicted from an EOS put in front "
        "(the document boundary of packed training), so every byte of the text is predicted",
    )
    parser.add_argument(
        "--max-docs", type=int, default=None, help="score at most N documents per source"
    )
    parser.add_argument(
        "--batch-tokens",
        type=int,
        default=16384,
        help="padded tokens per forward pass (default 16384; lower it if memory runs out)",
    )
    parser.add_argument(
        "--per-doc", action="store_true", help="also report every document (stdout and --json)"
    )
    parser.add_argument("--json", metavar="OUT", help="write the results to this JSON file")
    add_device_argument(parser)
    parser.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="forward precision: bf16 autocast or fp32 (auto: bf16 on CUDA, fp32 on CPU); "
        "the NLL is always taken in fp32",
    )


def run_eval(args: argparse.Namespace) -> int:
    """``kha-train eval``: score every requested text, print a table, write ``--json``."""
    import torch

    from kha_train.config import AttnBackend, ConfigError
    from kha_train.tools.weights_io import load_source_config
    from kha_train.training.scoring import check_window

    sharded = int(os.environ.get("WORLD_SIZE", "1")) > 1  # under torchrun: see _score_sharded
    sources = [_parse_named(s, "--source", "NAME=PATH") for s in args.sources]
    datas = [_parse_data(d, args.split) for d in args.data]
    if args.split not in ("val", "train"):
        raise ConfigError(f"--split must be val or train, got {args.split!r}")
    if args.max_docs is not None and args.max_docs < 1:
        raise ConfigError(f"--max-docs must be >= 1, got {args.max_docs}")
    if args.batch_tokens < 1:
        raise ConfigError(f"--batch-tokens must be >= 1, got {args.batch_tokens}")
    ckpt = resolve_checkpoint(Path(args.checkpoint))
    if sharded and not ckpt.is_dir():
        raise ConfigError(
            f"{ckpt}: under torchrun kha-train eval shards a trainer checkpoint (a run directory "
            "or a step_XXXXXXX folder) over the ranks; a weights file holds the whole model: "
            "evaluate it without torchrun"
        )
    cfg = load_source_config(ckpt, args.config, args.overrides)
    window = args.window or cfg.data.seq_len
    stride = args.stride if args.stride is not None else window // 2
    check_window(window, stride)
    device = torch.device(
        args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    )
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    if device.type != "cuda" and cfg.model.attn_backend not in (AttnBackend.auto, "math"):
        print(f"note: model.attn_backend={cfg.model.attn_backend.value} needs CUDA; using auto")
        cfg.model.attn_backend = AttnBackend.auto

    # Everything about the text is checked before the model is loaded.
    plan = plan_sources(
        cfg,
        run_val=not args.no_val,
        sources=sources,
        datas=datas,
        split=args.split,
        tokenizer=args.tokenizer,
        text_field=args.text_field,
        txt_sample_by=args.txt_sample_by,
    )
    settings = {
        "window": window,
        "stride": stride,
        "score_first": args.score_first,
        "device": str(device),
        "precision": "bf16" if bf16 else "fp32",
        "tokenizer": plan.tokenizer.path if plan.tokenizer else None,
        "tokenizer_hash": plan.tokenizer.hash if plan.tokenizer else None,
        "max_docs": args.max_docs,
    }
    main = True
    try:
        if sharded:
            results, main, settings["device"] = _score_sharded(
                plan, ckpt, cfg, args, window, stride, bf16
            )
            settings["ranks"] = int(os.environ["WORLD_SIZE"])
        else:
            results = _score_plan(plan, ckpt, cfg, device, args, window, stride, bf16)
    finally:
        if plan.work_dir is not None:
            shutil.rmtree(plan.work_dir, ignore_errors=True)
    if not main:
        return 0  # rank 0 reports
    report = build_report(ckpt, cfg, settings, results, per_doc=args.per_doc)
    print_report(report, per_doc=args.per_doc)
    if args.json:
        write_json(Path(args.json), report)
        print(f"wrote {args.json}")
    return 0


def _score_plan(
    plan: Plan, ckpt: Path, cfg: Config, device: torch.device, args: argparse.Namespace,
    window: int, stride: int, bf16: bool,
) -> list[SourceResult]:  # fmt: skip
    """Load the model, then score every item of ``plan``."""
    from kha_train.tools.weights_io import load_model
    from kha_train.training.scoring import score_documents

    model = load_model(cfg.model, ckpt, device)
    model.eval()
    results = []
    for item in plan.items:
        docs = item.documents(score_first=args.score_first, max_docs=args.max_docs)
        scores = score_documents(
            model, docs, window=window, stride=stride, batch_tokens=args.batch_tokens, bf16=bf16
        )
        result = SourceResult(item.name, item.kind, item.path, item.split)
        for i, s in enumerate(scores):
            result.add(i, s, per_doc=args.per_doc)
        if result.docs == 0:
            raise _no_documents(item)
        results.append(result)
    return results


def _score_sharded(
    plan: Plan, ckpt: Path, cfg: Config, args: argparse.Namespace, window: int, stride: int,
    bf16: bool,
) -> tuple[list[SourceResult], bool, str]:  # fmt: skip
    """Under torchrun: the model sharded by FSDP2 as in training (a model too large for one
    device fits), each rank scoring every ``ranks``-th batch of fixed-shape windows (FSDP2's
    forward is a collective: a rank out of batches runs an empty one), the NLL of each document
    summed over ranks. Returns (results, whether this is rank 0, the device)."""
    import math

    import torch
    import torch.distributed as dist

    from kha_train.config import ACMode, Precision
    from kha_train.tools.weights_io import load_sharded_weights
    from kha_train.training import distributed as D
    from kha_train.training.build import build_model
    from kha_train.training.scoring import (
        DocScore,
        batch_windows,
        plan_windows,
        token_nll,
        window_tensors,
    )  # fmt: skip

    env = D.init_distributed(args.device)
    try:
        cfg.parallel.compile = False  # a few forwards: compiling would take longer
        cfg.parallel.single_device = False  # sharded over the ranks, whatever the run trained with
        cfg.parallel.activation_checkpointing = ACMode.none
        precision = Precision.bf16 if bf16 else Precision.fp32
        model = build_model(cfg.model, cfg.parallel, precision, env.device, seed=0)
        load_sharded_weights(model, ckpt)
        rows = max(1, args.batch_tokens // window)
        empty = window_tensors([], [], window, rows)
        results = []
        for item in plan.items:
            docs = [d for d in item.documents(score_first=args.score_first,
                                              max_docs=args.max_docs) if len(d.ids) >= 2]  # fmt: skip
            ids = [d.ids for d in docs]
            batches = batch_windows(plan_windows(ids, window, stride), rows)
            mine = batches[env.rank :: env.world_size]
            nll = torch.zeros(len(docs), dtype=torch.float64, device=env.device)
            for j in range(math.ceil(len(batches) / env.world_size)):
                if j >= len(mine):
                    token_nll(model, *empty)
                    continue
                rows_nll = token_nll(model, *window_tensors(ids, mine[j], window, rows))
                doc_of_row = torch.tensor([w.doc for w in mine[j]], device=env.device)
                nll.index_add_(0, doc_of_row, rows_nll[: len(mine[j])].double().sum(dim=1))
            dist.all_reduce(nll)
            result = SourceResult(item.name, item.kind, item.path, item.split)
            for i, (d, x) in enumerate(zip(docs, nll.tolist())):
                result.add(i, DocScore(x, len(d.ids) - 1, d.nbytes), per_doc=args.per_doc)
            if result.docs == 0:
                raise _no_documents(item)
            results.append(result)
        return results, env.is_main, str(env.device)
    finally:
        D.teardown()


def _parse_named(value: str, option: str, form: str) -> tuple[str, str]:
    from kha_train.config import ConfigError

    name, sep, path = value.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise ConfigError(
            f"{option} {value!r}: write {form}, e.g. {option} wiki=data/wiki.jsonl (the name "
            "labels the figures)"
        )
    return name.strip(), path.strip()


def _parse_data(value: str, split: str) -> tuple[str, str]:
    if "=" in value and not Path(value).exists():
        return _parse_named(value, "--data", "[NAME=]DIR")
    return f"{Path(value).name or value}:{split}", value


def resolve_checkpoint(path: Path) -> Path:
    """The weights ``path`` names: a run directory becomes its newest complete checkpoint
    (``checkpoints/`` inside it, else ``checkpoint.dir`` of its ``config.yaml``); a checkpoint
    folder or a file is returned as is (weights_io checks it)."""
    from kha_train.config import ConfigError, load_config
    from kha_train.training.checkpoint import latest_checkpoint

    if not path.is_dir() or (path / ".metadata").is_file():
        return path
    places = [path / "checkpoints"]
    if (path / "config.yaml").is_file():
        try:
            ckpt_dir = load_config(path / "config.yaml").checkpoint.dir
        except ConfigError:
            ckpt_dir = None
        if ckpt_dir:
            places.append(Path(ckpt_dir))
    for place in places:
        found = latest_checkpoint(place)
        if found is not None:
            return found
    raise ConfigError(
        f"{path} is neither a checkpoint folder (it has no .metadata) nor a run directory with a "
        f"complete checkpoint (looked in {', '.join(map(str, dict.fromkeys(places)))}): give a "
        "run directory whose training saved a checkpoint, a step_XXXXXXX folder, or a weights "
        "file with --config"
    )


# -- what to score ---------------------------------------------------------------------------


@dataclass
class EvalItem:
    """One named text to score: a split of a prepared dataset, or a raw-text source."""

    name: str
    kind: str  # "dataset" | "text"
    path: str
    split: str | None
    index: DatasetIndex | None = None  # datasets
    source: Any = None  # raw text: the SourceSpec
    tokenizer: LoadedTokenizer | None = None
    work_dir: str | None = None  # raw text: where datasets keeps its Arrow cache

    def documents(self, *, score_first: bool, max_docs: int | None) -> Iterator[Document]:
        from kha_train.data.documents import dataset_documents, source_documents

        assert self.tokenizer is not None
        if self.kind == "dataset":
            assert self.index is not None and self.split is not None
            return dataset_documents(
                self.index, self.split, self.tokenizer, score_first=score_first, max_docs=max_docs
            )
        return source_documents(
            self.source, self.tokenizer, self.work_dir, score_first=score_first, max_docs=max_docs
        )


@dataclass
class Plan:
    items: list[EvalItem]
    tokenizer: LoadedTokenizer | None  # the run's tokenizer (None: only --data with their own)
    work_dir: str | None = None  # scratch folder of raw-text sources (Arrow cache); delete after


def plan_sources(
    cfg: Config,
    *,
    run_val: bool = True,
    sources: Sequence[tuple[str, str]] = (),
    datas: Sequence[tuple[str, str]] = (),
    split: str = "val",
    tokenizer: str | None = None,
    text_field: str = "text",
    txt_sample_by: str = "document",
) -> Plan:
    """Check every requested text against the model and the run's tokenizer; return what to
    score. Raises :class:`DataError` / :class:`ConfigError` with the fix."""
    import tempfile

    from kha_train.config import ConfigError
    from kha_train.data.errors import DataError
    from kha_train.data.shards import read_index
    from kha_train.data.sources import SourceSpec, resolve_local_files

    if not (run_val or sources or datas):
        raise ConfigError("nothing to score: drop --no-val, or add --source NAME=PATH / --data DIR")
    names = ([RUN_VAL] if run_val else []) + [n for n, _ in sources] + [n for n, _ in datas]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(
            f"two texts to score are named {', '.join(dupes)}: give each --source / --data its "
            f"own NAME ({RUN_VAL!r} is the run's val split)"
        )
    vocab = cfg.model.vocab_size
    dataset = cfg.data.dataset
    run_index = None
    if dataset and dataset != "???" and (Path(dataset) / "index.json").is_file():
        run_index = read_index(dataset)
    elif run_val:
        raise DataError(
            f"the run's dataset data.dataset={dataset} is not a prepared dataset here (no "
            "index.json): pass data.dataset=DIR after the checkpoint, or --no-val to score only "
            "--source / --data"
        )
    if run_index is not None:
        _check_index_vocab(run_index, vocab)
    tok = _run_tokenizer(cfg, tokenizer, run_index)
    run_hash = run_index.tokenizer_hash if run_index is not None else tok.hash if tok else None
    if tok is not None:
        if tok.vocab_size > vocab:
            raise DataError(
                f"tokenizer {tok.path} has {tok.vocab_size} ids but the model has "
                f"model.vocab_size={vocab}: it is not the tokenizer the model was trained with. "
                "Pass --tokenizer with the run's tokenizer (the tokenizer.json of its dataset)"
            )
        if run_index is not None and tok.hash != run_index.tokenizer_hash:
            raise DataError(
                f"tokenizer {tok.path} (hash {tok.hash}) is not the one the run's dataset "
                f"{run_index.directory} was prepared with (hash {run_index.tokenizer_hash}): "
                f"pass --tokenizer {run_index.directory / 'tokenizer.json'}, or fix data.tokenizer"
            )
    items: list[EvalItem] = []
    work = ""
    if run_val:
        assert run_index is not None
        _check_split(run_index, "val", "data.dataset", "pass --no-val")
        items.append(
            EvalItem(RUN_VAL, "dataset", str(run_index.directory), "val", run_index,
                     tokenizer=_need_tokenizer(tok, run_index, RUN_VAL))
        )  # fmt: skip
    for name, path in datas:
        index = read_index(path)
        _check_index_vocab(index, vocab)
        if run_hash is not None and index.tokenizer_hash != run_hash:
            raise DataError(
                f"--data {path} was tokenized with tokenizer {index.tokenizer_hash} "
                f"({index.raw['tokenizer'].get('path')}), the model with {run_hash}: its token ids "
                "mean other text to this model. Prepare the text with the run's tokenizer "
                f"(`kha-train data prepare --tokenizer {tok.path if tok else 'RUN_TOKENIZER'} "
                "--out NEW_DIR`) or score the raw text with --source NAME=PATH"
            )
        _check_split(index, split, f"--data {path}", "use another --split or dataset")
        items.append(
            EvalItem(name, "dataset", str(index.directory), split, index,
                     tokenizer=tok if tok is not None else _own_tokenizer(index, name))
        )  # fmt: skip
    if sources:
        if tok is None:
            raise DataError(
                "no tokenizer for --source text: pass --tokenizer with the run's tokenizer.json "
                "(data.tokenizer is unset and data.dataset holds no tokenizer.json)"
            )
        work = tempfile.mkdtemp(prefix="kha-eval-")
        for name, path in sources:
            resolve_local_files(path)  # missing / empty / unsupported files: one error now
            spec = SourceSpec(spec=path, text_field=text_field, txt_sample_by=txt_sample_by)
            items.append(EvalItem(name, "text", path, None, source=spec, tokenizer=tok,
                                  work_dir=work))  # fmt: skip
    return Plan(items, tok, work if sources else None)


def _check_index_vocab(index: DatasetIndex, vocab: int) -> None:
    from kha_train.data.errors import DataError

    if index.vocab_size > vocab:
        raise DataError(
            f"{index.path}: the dataset's tokenizer has {index.vocab_size} ids but the model has "
            f"model.vocab_size={vocab}: it was prepared with another tokenizer than the model's; "
            "score a dataset prepared with the run's tokenizer"
        )


def _check_split(index: DatasetIndex, split: str, what: str, fix: str) -> None:
    from kha_train.data.errors import DataError

    info = index.splits.get(split)
    if info is None or info.tokens == 0:
        hint = " (prepare it with --val-fraction > 0)" if split == "val" else ""
        raise DataError(f"{what}: {index.path} has no {split} documents{hint}; {fix}")


def _run_tokenizer(
    cfg: Config, explicit: str | None, run_index: DatasetIndex | None
) -> LoadedTokenizer | None:
    """--tokenizer, else data.tokenizer, else the tokenizer.json of the run's dataset; with the
    dataset's EOS token when the dataset is known."""
    from kha_train.data.errors import DataError
    from kha_train.data.tokenizer import TOKENIZER_FILE, load_tokenizer

    eos = run_index.raw["tokenizer"].get("eos_token") if run_index is not None else None
    for path, option in ((explicit, "--tokenizer"), (cfg.data.tokenizer, "data.tokenizer")):
        if path:
            if not Path(path).exists():
                raise DataError(f"{option} {path} does not exist: point it at the run's tokenizer")
            return load_tokenizer(path, eos)
    if run_index is not None and (run_index.directory / TOKENIZER_FILE).is_file():
        return load_tokenizer(run_index.directory / TOKENIZER_FILE, eos)
    return None


def _need_tokenizer(tok: LoadedTokenizer | None, index: DatasetIndex, name: str) -> LoadedTokenizer:
    return tok if tok is not None else _own_tokenizer(index, name)


def _own_tokenizer(index: DatasetIndex, name: str) -> LoadedTokenizer:
    """A prepared dataset's own tokenizer.json (bits per byte decode the tokens to text)."""
    from kha_train.data.errors import DataError
    from kha_train.data.tokenizer import TOKENIZER_FILE, load_tokenizer

    path = index.directory / TOKENIZER_FILE
    if not path.is_file():
        raise DataError(
            f"{name}: {index.directory} holds no {TOKENIZER_FILE}, and bits per byte needs it to "
            "decode the tokens: pass --tokenizer with the tokenizer it was prepared with"
        )
    tok = load_tokenizer(path, index.raw["tokenizer"].get("eos_token"))
    if tok.hash != index.tokenizer_hash:
        raise DataError(
            f"{path} is not the tokenizer {index.path} was prepared with (hash {tok.hash}, index "
            f"{index.tokenizer_hash}): pass --tokenizer with the right one"
        )
    return tok


def _no_documents(item: EvalItem) -> Exception:
    from kha_train.data.errors import DataError

    what = f"column {item.source.text_field!r} of " if item.kind == "text" else ""
    return DataError(
        f"{item.name}: {what}{item.path} holds no document with at least one token to predict: "
        "check the path" + (" and --text-field" if item.kind == "text" else "")
    )
