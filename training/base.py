"""`textmill base <model>`: make models/base/<model>/ in OpenAI's release layout, fetched and checked or made from scratch.

The folder holds `checkpoint`, `hparams.json`, `encoder.json`, `vocab.bpe`, `model.ckpt.index` and
`model.ckpt.data-00000-of-00001`, exactly the files of OpenAI's GPT-2 releases, so gpt-2-simple, the converter and the
trainer read it the same way whichever way it was made. It is assembled in a temporary folder and renamed into place.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Iterator

from fsspec.callbacks import TqdmCallback
from tqdm import tqdm

from textmill import config as config_mod
from textmill import sizes, storage, tokenizer, weights
from textmill.errors import UserError
from textmill.pipelines.clean_io import iter_docs
from textmill.training import openai_layout

log = logging.getLogger(__name__)

CKPT = "model.ckpt"
CKPT_FILES = (f"{CKPT}.index", f"{CKPT}.data-00000-of-00001")
FILES = ("checkpoint", "hparams.json", "encoder.json", "vocab.bpe", *CKPT_FILES)


write_hparams = openai_layout.write_hparams
read_hparams = openai_layout.read_hparams


def corpus_texts(cfg: config_mod.Config, model: str) -> Iterator[str]:
    """The text of every clean document of the model's corpora, streamed in corpus then file order."""
    for corpus in cfg.model_spec(model).corpora:
        for doc in tqdm(iter_docs(Path(cfg.paths.clean) / corpus), desc=f"bpe: {corpus}", unit="doc", leave=False):
            yield doc["text"]


def scratch(cfg: config_mod.Config, model: str, folder: Path, *, show_progress: bool = True) -> sizes.Hparams:
    """Train a byte-level BPE on the model's corpora and write fresh OpenAI-init weights sized by `model.size`."""
    from textmill.training.tf import checkpoint  # TF costs seconds to import: only the paths that write checkpoints pay it

    tok = tokenizer.train_bpe(corpus_texts(cfg, model), cfg.model.vocab_size, show_progress=show_progress)
    n_vocab = tokenizer.vocab_size(tok)
    if n_vocab < cfg.model.vocab_size:
        log.warning("BPE reached only %d of model.vocab_size=%d tokens: the corpora are small; using %d",
                    n_vocab, cfg.model.vocab_size, n_vocab)
    hp = sizes.from_name(cfg.model.size, n_ctx=cfg.model.n_ctx, n_vocab=n_vocab)
    folder.mkdir(parents=True)
    tokenizer.save_openai(tok, folder)
    write_hparams(hp, folder)
    checkpoint.save(dict(weights.init_numpy(hp, cfg.base.seed)), folder / CKPT)
    checkpoint.write_checkpoint_file(folder, CKPT, [CKPT])
    log.info("base %s: scratch %s (%s parameters), vocab %d, seed %d", model, cfg.model.size, f"{hp.n_params:,}",
             n_vocab, cfg.base.seed)
    return hp


def _download(fs, remote: str, local: Path, uri: str) -> None:
    try:
        with TqdmCallback(tqdm_kwargs={"desc": f"fetch {local.name}", "unit": "B", "unit_scale": True,
                                       "leave": False}) as cb:
            fs.get_file(remote, str(local), callback=cb)
    except FileNotFoundError:
        raise UserError(f"{storage.join(uri, local.name)}: not found; an OpenAI-layout folder has {', '.join(FILES)} "
                        f"(check base.uri)") from None


def _source_prefix(fs, root: str, uri: str, folder: Path) -> str:
    """Name of the checkpoint to fetch: from the source's `checkpoint` file (OpenAI: model.ckpt; gpt-2-simple: model-N)."""
    if not fs.exists(storage.join(root, "checkpoint")):
        return CKPT  # a bare release copy without its state file: OpenAI's name
    _download(fs, storage.join(root, "checkpoint"), folder / "checkpoint", uri)
    latest, _ = openai_layout.read_state(folder)
    # A path written on another machine (Colab's /content/drive/..., Windows' C:\\...) means nothing here: the
    # checkpoint sits beside its state file.
    return openai_layout.recorded_name(latest)


def fetch(cfg: config_mod.Config, uri: str, folder: Path) -> sizes.Hparams:
    """Copy an OpenAI-layout folder from any fsspec URI into `folder` (normalised to model.ckpt), then check it."""
    from textmill.training.tf import checkpoint

    fs, root = storage.filesystem(uri)
    folder.mkdir(parents=True)
    src = _source_prefix(fs, root, uri, folder)
    for name in ("hparams.json", "encoder.json", "vocab.bpe"):
        _download(fs, storage.join(root, name), folder / name, uri)
    for suffix in (".index", ".data-00000-of-00001"):
        _download(fs, storage.join(root, src + suffix), folder / (CKPT + suffix), uri)
    checkpoint.write_checkpoint_file(folder, CKPT, [CKPT])
    hp = check(cfg, folder, source=uri)
    log.info("base: fetched %s (%s parameters) from %s", cfg.model.size, f"{hp.n_params:,}", uri)
    return hp


def check(cfg: config_mod.Config, folder: Path, *, source: str) -> sizes.Hparams:
    """Every file present; tokenizer size == n_vocab; size matches model.size; every variable's name, shape and bytes."""
    missing = [f for f in FILES if not (folder / f).is_file()]
    if missing:
        raise UserError(f"{source}: missing {missing}; an OpenAI-layout folder has {', '.join(FILES)}")
    hp = read_hparams(folder / "hparams.json")
    tok = tokenizer.load(folder)
    _check_vocab_and_size(cfg, hp, tok, source, ("encoder.json", "hparams.json", "n_vocab"))
    if cfg.model.n_ctx is not None and cfg.model.n_ctx > hp.n_ctx:
        raise UserError(f"model.n_ctx={cfg.model.n_ctx} exceeds the fetched model's n_ctx={hp.n_ctx} "
                        f"(its position table has {hp.n_ctx} rows); lower model.n_ctx")
    _check_variables(folder / CKPT, hp, source)
    return hp


def _check_vocab_and_size(cfg: config_mod.Config, hp: sizes.Hparams, tok, source: str,
                          names: tuple[str, str, str]) -> None:
    """The tokenizer has hp.n_vocab tokens and hp is `model.size`; `names` = (vocab file, hparams file, its vocab key)
    as this layout spells them, for the one-line errors."""
    vocab_file, hparams_file, vocab_key = names
    if tokenizer.vocab_size(tok) != hp.n_vocab:
        raise UserError(f"{source}: {vocab_file} has {tokenizer.vocab_size(tok)} tokens but {hparams_file} {vocab_key}="
                        f"{hp.n_vocab}; the tokenizer files belong to another model")
    want = sizes.from_name(cfg.model.size, n_vocab=hp.n_vocab, n_ctx=hp.n_ctx)
    if want != hp:
        raise UserError(f"{source}/{hparams_file}: {hp.to_json()} is not model.size={cfg.model.size} "
                        f"({want.to_json()}); set model=<matching preset> or point base.uri at a {cfg.model.size} model")


def _check_variables(prefix: Path, hp: sizes.Hparams, source: str) -> None:
    from textmill.training.tf import checkpoint

    have = checkpoint.list_variables(prefix)
    expected = weights.openai_shapes(hp)
    absent = [n for n in expected if n not in have]
    if absent:
        raise UserError(f"{source}/{CKPT}: variable {absent[0]!r} missing ({len(absent)} of {len(expected)} model "
                        f"variables absent); this is not a GPT-2 checkpoint of hparams {hp.to_json()}")
    for name, shape in expected.items():
        if have[name] != shape:
            raise UserError(f"{source}/{CKPT}: variable {name!r} has shape {list(have[name])}, expected {list(shape)} "
                            f"for hparams {hp.to_json()}; hparams.json does not match the checkpoint")
    # Reading every tensor checks each one's CRC32C in the index: a truncated or corrupted download fails here, not
    # hours later in training.
    for _ in tqdm(checkpoint.iter_tensors(prefix, list(expected)), total=len(expected), desc="verify", leave=False):
        pass


def is_hf_uri(uri: str) -> bool:
    """`hf://org/name`, or a folder (any fsspec URI) holding config.json and no hparams.json."""
    if uri.startswith("hf://"):
        return True
    fs, root = storage.filesystem(uri)
    return fs.exists(storage.join(root, "config.json")) and not fs.exists(storage.join(root, "hparams.json"))


HF_FILES = ("config.json", "vocab.json", "merges.txt")  # + *.safetensors
HF_OPTIONAL = ("tokenizer.json", "generation_config.json")


def fetch_hf(cfg: config_mod.Config, uri: str, folder: Path) -> sizes.Hparams:
    """A Hugging Face GPT-2 folder (config.json + safetensors + vocab.json/merges.txt) from `hf://org/name[@rev]` (the
    Hub, online) or any fsspec URI, copied into `folder` as is and checked; a base for the PyTorch backend only."""
    folder.mkdir(parents=True)
    if uri.startswith("hf://"):
        repo, _, revision = uri[len("hf://"):].partition("@")
        try:
            from huggingface_hub import snapshot_download

            snapshot_download(repo, revision=revision or None, local_dir=str(folder),
                              allow_patterns=[*HF_FILES, *HF_OPTIONAL, "*.safetensors"])
        except Exception as e:  # offline, unknown repo, gated model, network: one line naming the URI
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"{uri}: cannot download from the Hugging Face Hub ({type(e).__name__}: {first}); check the "
                            f"name, the network (HF_HUB_OFFLINE) and access, or copy the folder and pass its path") from None
    else:
        fs, root = storage.filesystem(uri)
        names = [storage.join(root, n) for n in (*HF_FILES, *HF_OPTIONAL)]
        weights_files = [p for p in fs.glob(storage.join(root, "*.safetensors"))]
        if not weights_files:
            raise UserError(f"{uri}: no *.safetensors; a Hugging Face folder has {', '.join(HF_FILES)} and "
                            f"model.safetensors")
        for remote in names[: len(HF_FILES)]:
            _download(fs, remote, folder / remote.rsplit("/", 1)[-1], uri)
        for remote in [*names[len(HF_FILES):], *weights_files]:
            if fs.exists(remote):
                _download(fs, remote, folder / str(remote).rsplit("/", 1)[-1], uri)
    return check_hf(cfg, folder, source=uri)


def check_hf(cfg: config_mod.Config, folder: Path, *, source: str) -> sizes.Hparams:
    """config.json is a GPT-2 of `model.size`; the tokenizer has n_vocab tokens; every weight has its shape."""
    from safetensors import safe_open

    from textmill.convert.names import hf_shapes
    from textmill.training import run

    missing = [f for f in HF_FILES if not (folder / f).is_file()]
    if missing or not any(folder.glob("*.safetensors")):
        raise UserError(f"{source}: missing {missing or ['*.safetensors']}; a Hugging Face GPT-2 folder has "
                        f"{', '.join(HF_FILES)} and model.safetensors")
    hp = run.base_hparams(folder)
    tok = tokenizer.from_openai_files(folder / "vocab.json", folder / "merges.txt")  # the same files under HF names
    _check_vocab_and_size(cfg, hp, tok, source, ("vocab.json", "config.json", "vocab_size"))
    have = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "np") as sf:
            for key in sf.keys():
                full = key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}"
                have[full] = tuple(sf.get_slice(key).get_shape())
    for key, shape in hf_shapes(hp).items():
        if have.get(key) != shape:
            raise UserError(f"{source}: weight {key} has shape {list(have[key]) if key in have else 'missing'}, "
                            f"expected {list(shape)} for {hp.to_json()}; config.json does not match the weights")
    return hp


def make_base(cfg: config_mod.Config, model: str, out: Path | None = None, *, show_progress: bool = True) -> Path:
    """Build `{paths.base}/<model>/` (or `out`) atomically; returns the folder."""
    cfg.model_spec(model)
    dest = Path(out) if out is not None else Path(cfg.paths.base) / model
    with storage.atomic_path(dest) as tmp:
        if cfg.base.init == "fetch" and is_hf_uri(str(cfg.base.uri)):
            fetch_hf(cfg, str(cfg.base.uri), tmp)
        elif cfg.base.init == "fetch":
            fetch(cfg, str(cfg.base.uri), tmp)
        else:
            scratch(cfg, model, tmp, show_progress=show_progress)
    return dest


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="textmill base", description=__doc__.splitlines()[0])
    p.add_argument("model", help="a model name from `models:` in the config")
    config_mod.add_cli_arguments(p, "base.init=fetch --set base.uri=gs://bucket/gpt2/124M")
    p.add_argument("--out", type=Path, help="output folder (default {paths.base}/<model>)")
    args = p.parse_args(argv)
    cfg = config_mod.from_args(args)
    dest = make_base(cfg, args.model, args.out)
    print(f"base {args.model}: {dest} ({cfg.base.init})")
    return 0
