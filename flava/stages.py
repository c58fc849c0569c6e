"""The stage registry: the one answer to "which stages are there, and what does each read and write?".

Each ``Stage`` names its ``flava`` command, the library function that command runs, the data it reads, the
params keys it reads, and what it writes. ``dvc.yaml`` is rendered from this table (``flava stages dvc-yaml``;
a test keeps the committed file equal to the rendering), the CLI dispatches the data stages through it, and the
training stages take their checkpoint identity from it (:func:`stage_identity`).

Code dependencies are not listed by hand: they are the project modules the stage's command can execute, found
by following the imports (module level and inside functions) from the CLI and the stage's entry module. A test
runs every stage with ``$FLAVA_RECORD_READS`` and checks that the modules it loaded and the params keys it read
are all declared, so a new import or a new config read cannot slip past DVC.

Paths in deps and outs are DVC templates over ``params.yaml`` (``${paths.prepared}``): ``paths.*`` has one home.
"""
from __future__ import annotations

import ast
import hashlib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import yaml

from flava.config import PipelineConfig, dump_config

PACKAGE_ROOT = Path(__file__).resolve().parent  # .../flava
PROJECT_ROOT = PACKAGE_ROOT.parent
CLI_MODULE = "flava.cli"
# The `flava` command-group modules, in the order they appear in `flava --help` (flava.cli imports them by name).
CLI_GROUPS = ("flava.cli.pipeline", "flava.cli.data", "flava.cli.pretrain", "flava.cli.evaluate", "flava.cli.launch",
              "flava.cli.stages", "flava.cli.registry")


@dataclass(frozen=True)
class Out:
    path: str
    cache: bool = True
    persist: bool = False  # DVC keeps it before re-running the stage (and skips the run-cache)


@dataclass(frozen=True)
class Stage:
    name: str
    command: tuple[str, ...]  # the ``flava`` subcommand words
    entry: str  # "module:function" the command runs
    deps: tuple[str, ...]  # data the stage reads (DVC templates)
    params: tuple[str, ...]  # params.yaml keys the stage reads (a key covers everything below it)
    outs: tuple[Out, ...] = ()
    metrics: tuple[Out, ...] = ()
    plots: tuple[str, ...] = ()
    help: str = ""
    whole_params_file: bool = False  # depends on all of params.yaml (only the stage that resolves it)

    @property
    def cmd(self) -> str:
        return " ".join(("flava", *self.command))

    @property
    def module(self) -> str:
        return self.entry.partition(":")[0]

    @property
    def function(self) -> str:
        return self.entry.partition(":")[2]


# Keys every stage reads that do not change what it produces: where MLflow is, how fast data is loaded, where
# checkpoints for resume live. Declaring them would re-run stages for no reason.
NOT_DEPENDENCIES: dict[str, str] = {
    "tracking": "where runs are logged, not what is computed",
    "paths.checkpoints": "where an interrupted run resumes from; the checkpoint identity guards what is resumed",
    "data.loader.num_workers": "loader parallelism; batches are a function of the seed, not of the worker count",
    "data.loader.prefetch_factor": "loader look-ahead, not content",
    "data.loader.start_method": "how loader workers start, not what they load",
    "data.loader.verify_checksums": "whether shard checksums are checked while loading; a mismatch fails the run",
    "data.shards.s3": "S3 endpoint and retries of the shard store, not content",
    "data.ingest.s3": "S3 endpoint and retries for reading images, not content",
    "data.engine.kind": "where the data stages' partitions run; outputs are the same bytes on every engine (tested)",
    "data.engine.workers": "how many Dask workers; results come back in partition order",
    "data.engine.address": "which Dask scheduler runs the partitions, not what they compute",
    "train.keep_last": "how many checkpoints are kept",
    "train.checkpoint_every": "where checkpoints fall; resume is exact (tested), so not what is trained",
    "train.peak_tflops": "the MFU denominator, logged to the run file, not a metric",
    "eval.registry.lock_timeout_s": "how long a promoter waits for the registry lock",
    "eval.registry.lock_uri": "where promotions are serialised",
}

_PREPARED = "${paths.prepared}"
_VALIDATED = "${paths.validated}"
# The shard stage's local directory (the shards themselves, or their index when they live on S3: see
# flava.data.shards): DVC tracks it, never an s3:// prefix.
_SHARDS = "${paths.shard_index}"
_ARTIFACTS = "${paths.artifacts}"
_MODELS = "${paths.models}"
_REPORTS = "${paths.reports}"
_CORPORA = ("pairs", "images", "text")
# The images of the validated manifests: validate's pack members for converted images, and for those it kept as
# they are the source images themselves, under paths.raw or prepare's packs (flava.data.validate).
_VALIDATED_IMAGES = (f"{_VALIDATED}/images", f"{_PREPARED}/extracted", "${paths.raw}")

# What every pretraining stage reads of data/model/train (the stage's own train.<stage> section is added).
_TRAIN_COMMON = (
    "seed", "model", "data.loader", "data.masking", "data.tokenizer.max_length",
    "train.preset", "train.precision", "train.accumulation", "train.grad_clip", "train.on_nonfinite",
    "train.max_consecutive_skips", "train.optimizer", "train.schedule", "train.strategy", "train.deterministic",
    "train.compile", "train.activation_checkpointing", "train.log_every", "train.device",
)


def _pretrain(name: str, kind: str, deps: tuple[str, ...], params: tuple[str, ...], help: str) -> Stage:
    return Stage(
        name=name, command=("pretrain", kind), entry="flava.train.stages:run_pretrain",
        deps=deps, params=_TRAIN_COMMON + params,
        outs=(Out(f"{_MODELS}/{kind}"), Out(f"{_REPORTS}/{name}.run.json", cache=False)),
        metrics=(Out(f"{_REPORTS}/{name}.json", cache=False),),
        plots=(f"{_REPORTS}/curves/{name}.csv",) + ((f"{_REPORTS}/curves/joint_zeroshot.csv",) if kind == "joint"
                                                    else ()),
        help=help,
    )


# The effective config: params.yaml with the presets resolved and every default spelled out. The other stages
# declare their keys in this file, so a preset change re-runs exactly the stages whose resolved values moved and
# a key params.yaml leaves to its default is still tracked.
EFFECTIVE_PARAMS = f"{_REPORTS}/params.yaml"

STAGES: tuple[Stage, ...] = (
    Stage(
        name="params", command=("stages", "resolve"), entry="flava.stages:run_resolve", deps=(), params=(),
        outs=(Out(EFFECTIVE_PARAMS, cache=False),), whole_params_file=True,
        help="resolve params.yaml (presets, defaults) into the effective config the other stages read",
    ),
    Stage(
        name="prepare", command=("data", "prepare"), entry="flava.data.ingest:run_prepare",
        # data.engine.partition_rows: CSV/TSV/JSONL manifests are prepared in row ranges of that many rows (the
        # partitions' files depend on it, the manifests and metrics do not)
        deps=("${paths.raw}",), params=("seed", "data.ingest", "data.engine.partition_rows"),
        outs=tuple(Out(f"{_PREPARED}/{c}.jsonl") for c in _CORPORA) + (Out(f"{_PREPARED}/eval"),)
        + tuple(Out(f"{_PREPARED}/{c}.rejects.jsonl") for c in _CORPORA)
        + (Out(f"{_PREPARED}/extracted"),  # packs of image bytes embedded in parquet/arrow cells and compressed tars
           Out(f"{_PREPARED}/partitions")),  # per source unit: rows, rejects, summary (resume, flava.data.ingest)
        metrics=(Out(f"{_PREPARED}/metrics.json", cache=False),),
        help="ingest raw corpora into per-corpus manifests",
    ),
    Stage(
        # Reads the images the manifests point at, which live under paths.raw: a raw image replaced under the
        # same name leaves the manifests unchanged but not the validated images.
        name="validate", command=("data", "validate"), entry="flava.data.validate:run_validate",
        deps=tuple(f"{_PREPARED}/{c}.jsonl" for c in _CORPORA) + (f"{_PREPARED}/extracted", "${paths.raw}"),
        # data.engine.partition_rows: the partitions' outputs and the aggregated GE results depend on it (the rows,
        # images and metrics do not); data.engine's other keys only say where the partitions run
        params=("data.validation", "data.engine.partition_rows"),
        outs=tuple(Out(f"{_VALIDATED}/{c}.jsonl") for c in _CORPORA) + (Out(f"{_VALIDATED}/images"),)
        + tuple(Out(f"{_VALIDATED}/{c}.rejects.jsonl") for c in _CORPORA)
        + (Out(f"{_VALIDATED}/ge"), Out(f"{_VALIDATED}/report.md"), Out(f"{_VALIDATED}/partitions")),
        metrics=(Out(f"{_VALIDATED}/metrics.json", cache=False),),
        help="validate manifests with Great Expectations; quarantine bad rows with reasons",
    ),
    Stage(
        name="shard", command=("data", "shard"), entry="flava.data.shards:run_shard",
        deps=tuple(f"{_VALIDATED}/{c}.jsonl" for c in _CORPORA) + _VALIDATED_IMAGES,
        # paths.shards: where the tars go is part of what the stage writes (the index records it) once that is not
        # the tracked directory itself (another bucket must re-shard)
        # data.engine.partition_rows: with several partitions each is shuffled and packed on its own
        params=("seed", "data.shards", "paths.shards", "data.engine.partition_rows"),
        # partitions: the bookkeeping of resume (flava.data.shards), apart from the corpus directories the stages
        # downstream depend on
        outs=tuple(Out(f"{_SHARDS}/{c}") for c in _CORPORA) + (Out(f"{_SHARDS}/partitions"),),
        metrics=(Out(f"{_SHARDS}/metrics.json", cache=False),),
        help="write webdataset shards (local or s3://) with an index",
    ),
    Stage(
        name="fit", command=("data", "fit"), entry="flava.data.fit:run_fit",
        deps=tuple(f"{_VALIDATED}/{c}.jsonl" for c in _CORPORA) + _VALIDATED_IMAGES,
        params=("seed", "data.tokenizer", "data.codebook", "data.loader", "model"),
        outs=(Out(f"{_ARTIFACTS}/tokenizer"), Out(f"{_ARTIFACTS}/codebook")),
        metrics=(Out(f"{_ARTIFACTS}/fit.json", cache=False),),
        help="fit the WordPiece tokenizer and the image codebook",
    ),
    _pretrain("pretrain_text", "text", (f"{_SHARDS}/text", f"{_ARTIFACTS}/tokenizer", f"{_ARTIFACTS}/codebook"),
              ("train.text",), "stage 1: text encoder with MLM on the text corpus"),
    _pretrain("pretrain_image", "image", (f"{_SHARDS}/images", f"{_ARTIFACTS}/codebook", f"{_ARTIFACTS}/tokenizer"),
              ("train.image",), "stage 1: image encoder with MIM on the image corpus"),
    _pretrain("joint", "joint",
              (f"{_MODELS}/text", f"{_MODELS}/image") + tuple(f"{_SHARDS}/{c}" for c in _CORPORA)
              + (f"{_ARTIFACTS}/tokenizer", f"{_ARTIFACTS}/codebook", f"{_PREPARED}/eval", "${paths.raw}/eval"),
              ("train.joint", "train.eval_every", "train.eval_batch_size", "data.mixing"),
              "stage 2: whole FLAVA on the mixed corpora, zero-shot model selection"),
    Stage(
        name="evaluate", command=("evaluate",), entry="flava.eval.run:run_evaluate",
        deps=(f"{_MODELS}/joint", f"{_PREPARED}/eval", "${paths.raw}/eval"),
        params=("seed", "eval.device", "eval.batch_size", "eval.zeroshot", "eval.retrieval", "eval.probe",
                "eval.text_finetune", "eval.multimodal_finetune", "eval.benchmarks", "eval.plot_dpi", "eval.log_model",
                "data.loader.mean", "data.loader.std", "data.loader.resample", "data.tokenizer.max_length"),
        outs=(Out(f"{_REPORTS}/eval/plots"), Out(f"{_REPORTS}/eval/report.md"), Out(f"{_REPORTS}/eval/report.html"),
              Out(f"{_REPORTS}/eval/run.json", cache=False)),
        metrics=(Out(f"{_REPORTS}/eval/metrics.json", cache=False),),
        help="evaluate models/joint/best: zero-shot, retrieval, probe, fine-tunes, report",
    ),
    Stage(
        # promotion.json is persistent: DVC must not delete the git-tracked decision before the registry answers
        # (and a registry action must not be restored from DVC's run-cache).
        name="promote", command=("promote",), entry="flava.tracking.registry:run_promote",
        deps=(f"{_REPORTS}/eval/metrics.json", f"{_REPORTS}/eval/run.json", f"{_MODELS}/joint"),
        params=("eval.registry",),
        # the decision record (version, run ids, reasons), not a metric: outside `dvc metrics`
        outs=(Out(f"{_REPORTS}/promotion.json", cache=False, persist=True),),
        help="register the evaluated model and gate it against @champion",
    ),
)

BY_NAME: dict[str, Stage] = {stage.name: stage for stage in STAGES}
# The pretraining stage names the training code uses ("text") -> registry names ("pretrain_text").
PRETRAIN_STAGE = {"text": "pretrain_text", "image": "pretrain_image", "joint": "joint"}


def get(name: str) -> Stage:
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(BY_NAME)}") from None


def by_command(words: Iterable[str]) -> Stage | None:
    words = tuple(words)
    return next((s for s in STAGES if s.command == words), None)


# ------------------------------------------------------------------------------------------- code dependencies
def _module_file(module: str) -> Path | None:
    parts = module.split(".")
    if parts[0] != "flava":
        return None
    base = PROJECT_ROOT.joinpath(*parts)
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _imports(path: Path, module: str, top_level: bool = False) -> set[str]:
    """Project modules a file imports (anywhere, or at module level only), and their parent packages."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in (tree.body if top_level else ast.walk(tree)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    modules = set()
    for name in found:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
            prefix = ".".join(parts[:i])
            if _module_file(prefix) is not None:
                modules.add(prefix)
    return modules


# Modules a module runs without importing them: the logged MLflow model's entry file, which runs.py hands to MLflow
# by path ("model from code") and which decides what the logged model computes.
LOADED_BY_PATH: dict[str, tuple[str, ...]] = {"flava.tracking.runs": ("flava.tracking.pyfunc_entry",)}


def import_closure(roots: Iterable[str], top_level: bool = False) -> set[str]:
    """Every project module reachable from ``roots`` by imports (module-level ones only if ``top_level``)."""
    todo, seen = list(roots), set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        path = _module_file(module)
        if path is None:
            continue
        seen.add(module)
        todo.extend(_imports(path, module, top_level) - seen)
        todo.extend(LOADED_BY_PATH.get(module, ()))
    return seen


# The CLI package and its command-group modules (imported by name when the parser is built): every command loads
# them and what they import at module level; a handler's function-level imports run only for its own command.
CLI_ROOTS = (CLI_MODULE, "flava.__main__", *CLI_GROUPS)


@lru_cache(maxsize=None)
def code_modules(stage: Stage) -> tuple[str, ...]:
    return tuple(sorted(import_closure(CLI_ROOTS, top_level=True) | import_closure([stage.module])))


def code_files(stage: Stage) -> list[str]:
    """The stage's code dependencies as project-relative POSIX paths."""
    return sorted(_module_file(m).relative_to(PROJECT_ROOT).as_posix() for m in code_modules(stage))


# ---------------------------------------------------------------------------------------------- dvc.yaml render
DVC_YAML_HEADER = """\
# Rendered from flava/stages.py by `flava stages dvc-yaml > dvc.yaml`; do not edit by hand (a test checks it).
# DVC re-runs a stage when its code (every project module its command can run), its data deps, or the params
# keys it reads change. Paths come from params.yaml's `paths:` section through DVC templating.
"""


def _out_entry(out: Out) -> Any:
    options = {}
    if not out.cache:
        options["cache"] = False
    if out.persist:
        options["persist"] = True
    return {out.path: options} if options else out.path


def _expand(key: str, tree: dict[str, Any]) -> list[str]:
    """``key``, or its children when a key in NOT_DEPENDENCIES lies below it (DVC tracks a key as a whole)."""
    if key in NOT_DEPENDENCIES:
        return []
    if not any(k.startswith(key + ".") for k in NOT_DEPENDENCIES):
        return [key]
    node = tree
    for part in key.split("."):
        node = node[part]
    return [k for child in node for k in _expand(f"{key}.{child}", tree)]


def params_keys(stage: Stage) -> list[str]:
    """The params keys DVC tracks for ``stage``: its declared keys less those that are not dependencies."""
    tree = PipelineConfig().model_dump(mode="json")
    return [k for key in stage.params for k in _expand(key, tree)]


def dvc_stage(stage: Stage) -> dict[str, Any]:
    params = [{"params.yaml": None}] if stage.whole_params_file else [{EFFECTIVE_PARAMS: params_keys(stage)}]
    entry: dict[str, Any] = {"cmd": stage.cmd, "deps": [*stage.deps, *code_files(stage)], "params": params}
    if stage.outs:
        entry["outs"] = [_out_entry(o) for o in stage.outs]
    if stage.metrics:
        entry["metrics"] = [_out_entry(o) for o in stage.metrics]
    if stage.plots:
        entry["plots"] = [{p: {"cache": False}} for p in stage.plots]
    return entry


def render_dvc_yaml() -> str:
    doc = {"stages": {stage.name: dvc_stage(stage) for stage in STAGES}}
    plots = [{p: {"x": "step"}} for stage in STAGES for p in stage.plots]
    doc["plots"] = plots + [{f"{_REPORTS}/eval/plots": {}}]
    return DVC_YAML_HEADER + yaml.safe_dump(doc, sort_keys=False, width=120)


def run_resolve(cfg: PipelineConfig) -> dict[str, Any]:
    """The ``params`` stage: write the effective config to ``paths.reports/params.yaml``."""
    path = Path(resolve(EFFECTIVE_PARAMS, cfg))
    dump_config(cfg, path)
    return {"effective_params": str(path), "params_hash": cfg.digest()}


# --------------------------------------------------------------------------------------------- stage identity
def resolve(template: str, cfg: PipelineConfig) -> str:
    """``${paths.x}/y`` -> the path under ``cfg`` (the same substitution DVC makes from params.yaml)."""
    out = template
    while "${" in out:
        start = out.index("${")
        end = out.index("}", start)
        value: Any = cfg
        for part in out[start + 2:end].split("."):
            value = getattr(value, part)
        out = f"{out[:start]}{value}{out[end + 1:]}"
    return out


def _param_value(cfg: PipelineConfig, key: str) -> Any:
    tree: Any = cfg.model_dump(mode="json")
    for part in key.split("."):
        tree = tree[part]
    return tree


def _hash_path(path: Path, digest: "hashlib._Hash") -> None:
    """Content hash of a file or directory tree (names and bytes, sorted; byte-code caches skipped)."""
    if path.is_file():
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return
    if not path.is_dir():
        digest.update(f"missing:{path.name}".encode())
        return
    for child in sorted(path.rglob("*")):
        if child.is_file() and "__pycache__" not in child.parts and child.suffix != ".pyc":
            digest.update(child.relative_to(path).as_posix().encode() + b"\0")
            with child.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)


def stage_identity(cfg: PipelineConfig, name: str, root: str | Path = ".") -> str:
    """What a run of stage ``name`` computes from: its code files, its data deps' contents and the values of the
    params keys it reads, hashed. A checkpoint is resumed only by a run of the same identity (the same run,
    interrupted); anything DVC would re-run the stage for gives another identity."""
    stage = get(name)
    root = Path(root)
    digest = hashlib.sha256(name.encode())
    params = {key: _param_value(cfg, key) for key in params_keys(stage)}
    digest.update(json.dumps(params, sort_keys=True).encode())
    for rel in code_files(stage):
        _hash_path(PROJECT_ROOT / rel, digest)
    for dep in stage.deps:
        _hash_path(root / resolve(dep, cfg), digest)
    return digest.hexdigest()[:16]


@dataclass
class Audit:
    """What one stage run read, as recorded by ``flava.config.ReadRecorder`` and ``sys.modules``."""

    params: set[str] = field(default_factory=set)
    modules: set[str] = field(default_factory=set)


def undeclared(stage: Stage, audit: Audit) -> dict[str, list[str]]:
    """Params keys and project modules a stage run used that the registry does not declare."""
    covered = tuple(stage.params) + tuple(NOT_DEPENDENCIES)
    keys = sorted(k for k in audit.params if not any(k == c or k.startswith(c + ".") for c in covered)
                  and not k.startswith("paths."))
    modules = sorted(set(audit.modules) - set(code_modules(stage)))
    return {"params": keys, "modules": modules}
