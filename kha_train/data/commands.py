"""CLI: ``kha-train tokenizer train`` and ``kha-train data prepare`` (docs/data.md).

Only argparse is imported here; the handlers import the data modules when they run.
"""

from __future__ import annotations

import argparse

NO_PROGRESS_HELP = (
    "print only results and warnings (progress bars are drawn on a terminal only; a log file "
    "or pipe gets a plain progress line every 30 s instead)"
)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    tok = subparsers.add_parser(
        "tokenizer",
        help="train a byte-level BPE tokenizer",
        description="Tokenizer commands.",
    )
    tok_sub = tok.add_subparsers(title="tokenizer commands", metavar="COMMAND", required=True)
    train = tok_sub.add_parser(
        "train",
        help="train a byte-level BPE on a text source and write tokenizer.json",
        description=(
            "Train a byte-level BPE tokenizer (tokenizers library) on a text source and write "
            "tokenizer.json (plus tokenizer_config.json naming the EOS/pad tokens and recording "
            "the vocabulary size requested and reached). If OUT already exists it is kept "
            "unless --overwrite is given."
        ),
    )
    _add_source_args(train)
    train.add_argument(
        "--out", required=True, help="the tokenizer.json to write (or a folder to write it in)"
    )
    train.add_argument(
        "--vocab-size",
        type=int,
        default=8192,
        help=(
            "vocabulary size, special tokens included; a small text may support fewer tokens "
            "(a warning then says how many were reached)"
        ),
    )
    train.add_argument(
        "--special-tokens",
        default="<|endoftext|>,<|pad|>",
        help="comma-separated special tokens; they get the first ids (default: %(default)s)",
    )
    train.add_argument(
        "--eos-token", default=None, help="the end-of-document token (default: the first special)"
    )
    train.add_argument(
        "--pad-token",
        default=None,
        help="the padding token (default: the second special token, if any)",
    )
    train.add_argument("--min-frequency", type=int, default=2, help="minimum count of a merge")
    train.add_argument(
        "--max-docs", type=int, default=None, help="train on the first N documents only"
    )
    train.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    train.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
    train.set_defaults(func=_tokenizer_train)

    data = subparsers.add_parser(
        "data", help="prepare token datasets", description="Dataset commands."
    )
    data_sub = data.add_subparsers(title="data commands", metavar="COMMAND", required=True)
    prep = data_sub.add_parser(
        "prepare",
        help="tokenize a text source into token shards + index.json",
        description=(
            "Tokenize a text source into flat token shards (uint16/uint32) plus index.json, "
            "holding out whole documents for validation. Re-running resumes an interrupted run "
            "and does nothing when OUT is complete."
        ),
    )
    _add_source_args(prep)
    prep.add_argument("--tokenizer", required=True, help="tokenizer.json or a HF tokenizer dir")
    prep.add_argument("--out", required=True, help="output directory")
    prep.add_argument("--eos-token", default=None, help="override the tokenizer's EOS token")
    prep.add_argument(
        "--val-fraction",
        type=float,
        default=0.05,
        help="fraction of documents held out for validation (default: %(default)s)",
    )
    prep.add_argument(
        "--val-max-tokens",
        type=int,
        default=10_000_000,
        help="stop holding out once val has this many tokens; 0 for no cap (default: %(default)s)",
    )
    prep.add_argument(
        "--shard-tokens",
        type=int,
        default=100_000_000,
        help="train tokens per shard (default: %(default)s)",
    )
    prep.add_argument(
        "--num-proc",
        type=int,
        default=None,
        help="tokenizing processes (default: all cores for sources over 20k rows, else 1)",
    )
    prep.add_argument("--max-docs", type=int, default=None, help="read the first N rows only")
    prep.add_argument(
        "--dtype", choices=("uint16", "uint32"), default=None, help="default: uint16 if it fits"
    )
    prep.add_argument("--no-progress", action="store_true", help=NO_PROGRESS_HELP)
    prep.set_defaults(func=_data_prepare)


def _add_source_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("source")
    g.add_argument(
        "--source",
        required=True,
        help=(
            "builtin (the embedded corpus) | local files: a path, directory or glob of "
            ".jsonl/.json/.parquet/.txt (formats may be mixed), several separated by commas | "
            "hub:NAME (a Hugging Face Hub dataset, streamed)"
        ),
    )
    g.add_argument("--text-field", default="text", help="column holding the text (default: text)")
    g.add_argument(
        "--streaming", action="store_true", help="read local files lazily (no Arrow copy)"
    )
    g.add_argument(
        "--txt-sample-by",
        choices=("document", "paragraph", "line"),
        default="document",
        help=".txt files: one document per file, paragraph or line (default: document)",
    )
    g.add_argument("--hub-config", default=None, help="hub: configuration (subset) name")
    g.add_argument("--hub-split", default="train", help="hub: split (default: train)")
    g.add_argument("--hub-revision", default=None, help="hub: branch, tag or commit")
    g.add_argument(
        "--hub-data-files", default=None, help="hub: comma-separated files to read from the repo"
    )


def _source_spec(args: argparse.Namespace):
    from kha_train.data.sources import SourceSpec

    return SourceSpec(
        spec=args.source,
        text_field=args.text_field,
        streaming=args.streaming,
        hub_config=args.hub_config,
        hub_split=args.hub_split,
        hub_revision=args.hub_revision,
        hub_data_files=[f for f in (args.hub_data_files or "").split(",") if f],
        txt_sample_by=args.txt_sample_by,
    )


def _tokenizer_train(args: argparse.Namespace) -> int:
    from kha_train.data.tokenizer import train_tokenizer_from_source

    specials = [t for t in args.special_tokens.split(",") if t]
    train_tokenizer_from_source(
        _source_spec(args),
        args.out,
        vocab_size=args.vocab_size,
        special_tokens=specials,
        eos_token=args.eos_token,
        pad_token=args.pad_token,
        min_frequency=args.min_frequency,
        max_docs=args.max_docs,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    return 0


def _data_prepare(args: argparse.Namespace) -> int:
    from kha_train.data.prepare import PrepareOptions, prepare_dataset

    opts = PrepareOptions(
        out=args.out,
        tokenizer=args.tokenizer,
        eos_token=args.eos_token,
        val_fraction=args.val_fraction,
        val_max_tokens=args.val_max_tokens or None,
        shard_tokens=args.shard_tokens,
        num_proc=args.num_proc,
        max_docs=args.max_docs,
        dtype=args.dtype,
        progress=not args.no_progress,
    )
    prepare_dataset(_source_spec(args), opts)
    return 0
