"""`textmill <verb> ...`: one entry point; each verb's module is imported only when that verb runs (serve never loads TF)."""

from __future__ import annotations

import importlib
import logging
import os
import sys

from textmill.errors import UserError

# verb -> ("module:function", one-line help). Each function takes argv (list[str]) and returns an exit code.
VERBS: dict[str, tuple[str, str]] = {
    "clean": ("textmill.pipelines.clean:main", "clean a raw corpus (configured name, or --raw PATH... --out DIR)"),
    "base": ("textmill.training.base:main", "make models/base/<model>/ (fetch an OpenAI-layout checkpoint or init from scratch)"),
    "prepare": ("textmill.pipelines.prepare:main", "split + tokenize a model's clean corpora into data/tokens/<model>/"),
    "train": ("textmill.training.train:main", "train a model (training.backend tf: gpt-2-simple layout | pt: PyTorch, torchrun)"),
    "convert": ("textmill.convert.cli:main", "convert a TF checkpoint (OpenAI / gpt-2-simple / textmill run) or a PyTorch run to a HF folder"),
    "evaluate": ("textmill.training.evaluate:main", "validation loss/perplexity of an exported model with transformers"),
    "publish": ("textmill.registry_cli:publish_main", "publish an export folder as a new version in the bucket registry"),
    "models": ("textmill.registry_cli:models_main", "list models/versions in a registry (ls, show)"),
    "rollback": ("textmill.registry_cli:rollback_main", "point a model's LATEST at an earlier version"),
    "gc": ("textmill.registry_cli:gc_main", "delete old versions of a model, keeping N and the live one"),
    "sync": ("textmill.serving.sync:main", "one sync pass: bucket -> local verified cache, then exit"),
    "serve": ("textmill.serving.daemon:main", "run the serving daemon (sync loop + OpenAI-compatible HTTP API)"),
    "retrain": ("textmill.retrain:main", "scheduled retrain: dvc repro of the pipeline, then publish behind the gate"),
    "params": ("textmill.config:main", "regenerate params.yaml from configs/ (Hydra composition)"),
}


def _usage() -> str:
    width = max(map(len, VERBS))
    lines = ["usage: textmill <verb> [args...]   (textmill <verb> --help for a verb's options)", "", "verbs:"]
    lines += [f"  {v.ljust(width)}  {h}" for v, (_, h) in VERBS.items()]
    return "\n".join(lines)


# verb -> the pip extra that brings its dependencies (a serving node installs only textmill[serve]).
EXTRAS = {"clean": "clean", "base": "tf", "train": "tf", "convert": "tf,torch", "evaluate": "torch", "sync": "serve",
          "serve": "serve", "retrain": "pipeline"}
OWN_PACKAGES = {"textmill"}  # the card's folders install as textmill.<folder> (pyproject.toml package-dir)


def run_verb(verb: str, argv: list[str]) -> int:
    target, _ = VERBS[verb]
    module, func = target.split(":")
    try:
        entry = getattr(importlib.import_module(module), func)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] in OWN_PACKAGES:
            raise
        extra = EXTRAS.get(verb, "all")
        raise UserError(f"`textmill {verb}` needs the {e.name!r} package: pip install 'textmill[{extra}]'") from None
    return int(entry(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    level = os.environ.get("TEXTMILL_LOG_LEVEL", "INFO").upper()
    if level not in logging.getLevelNamesMapping():
        print(f"textmill: TEXTMILL_LOG_LEVEL={level!r} is not a log level (DEBUG, INFO, WARNING, ERROR)", file=sys.stderr)
        return 2
    logging.basicConfig(level=level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from textmill import __version__
        print(__version__)
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"textmill: unknown verb {verb!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        return run_verb(verb, rest)
    except UserError as e:
        print(f"textmill {verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"textmill {verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
