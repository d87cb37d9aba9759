"""CLI plumbing shared by every tool: options dataclasses, parsing, errors, provenance, RELION jobs.

A tool module (``disca_tools/cli/<tool>.py``) declares a dataclass of options built with :func:`opt`
(RELION-style short names such as ``--i``/``--o`` plus long descriptive names), and a ``run``
function that validates, calls the core and writes outputs. :func:`run_tool` does the rest:

* parsing with argparse-dataclass, the module docstring as the help text;
* ``--verbose``/``--quiet`` logging, progress bars;
* a :class:`~disca_tools.runtime.errors.UserError` ends as one line on stderr and exit status 2;
* ``note.txt`` and ``run.json`` in the output folder;
* RELION External job mode (``--in_parts`` & co., ``RELION_OUTPUT_NODES.star``, exit markers, abort).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

import argparse_dataclass

from .errors import JobAborted, UserError
from .log import add_abort_check, clear_abort_checks, configure, logger
from .provenance import now_iso, write_provenance

RELION_INPUT_FLAGS = (
    "--in_parts",
    "--in_mics",
    "--in_coords",
    "--in_3dref",
    "--in_mask",
    "--in_movies",
)

# Node types for RELION_OUTPUT_NODES.star: (RELION 3.1 integer type, RELION 4/5 type label).
NODE_TYPES = {
    "particles": (3, "ParticleGroupMetadata.star.relion"),
    # RELION 5 has no coordinate node type for tomograms: its pickers declare particle sets
    # (ParticleGroupMetadata.star.relion.tomo.manualpick, ...); 3.1 has 2 = coordinates.
    "coordinates": (2, "ParticleGroupMetadata.star.relion.tomo.coordinates"),
    "map": (6, "DensityMap.mrc"),
    "mask": (7, "Mask3D.mrc"),
    "tomograms": (1, "TomogramGroupMetadata.star.relion"),
    "optimisation_set": (3, "TomoOptimisationSet.star.relion"),
    "log": (13, "LogFile.pdf"),
}


def opt(*names: str, default: Any = MISSING, help: str = "", **metadata: Any) -> Any:
    """Declare an option: ``opt("--i", "--input", help=..., default=...)``.

    The first long name that is not RELION-style becomes the option's display name; every name is
    accepted. ``nargs``, ``choices``, ``type`` and ``metavar`` pass through to argparse. A bool with
    ``negatable=True`` accepts ``--x`` and ``--no-x`` (default None meaning "decide automatically").
    """
    text = help
    if default is not MISSING and default is not None and not isinstance(default, bool):
        text = f"{help} (default: {default})"
    md = {"args": list(names), "help": text, **metadata}
    if default is MISSING:
        return field(metadata=md)
    if isinstance(default, list | dict | set):
        return field(default_factory=lambda d=default: type(d)(d), metadata=md)
    return field(default=default, metadata=md)


@dataclass(kw_only=True)
class CommonOptions:
    """Options every tool accepts."""

    overwrite: bool = opt("--overwrite", default=False, help="replace existing outputs")
    verbose: bool = opt("--verbose", "-v", default=False, help="more log output")
    quiet: bool = opt(
        "--quiet", "-q", default=False, help="warnings and errors only; no progress bars"
    )
    j: int = opt("--j", "--jobs", default=1, help="worker processes/threads")


def resolve_jobs(j: int) -> int:
    """``--j``: ``j`` itself when positive; 0 means one per CPU core this process may use (its
    affinity: a SLURM allocation's cores, not the node's)."""
    if j < 0:
        raise UserError(f"--j: must be 0 (one per core) or more, got {j}")
    if j > 0:
        return int(j)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class _Parser(argparse_dataclass.ArgumentParser):
    """argparse-dataclass parser with negatable booleans and one-line usage errors."""

    def add_argument(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        dest = kwargs.get("dest")
        negatable = False
        if dest and dataclasses.is_dataclass(getattr(self, "_options_cls_hint", None)):
            for f in dataclasses.fields(self._options_cls_hint):
                if f.name == dest and f.metadata.get("negatable"):
                    negatable = True
        if negatable:
            kwargs.pop("type", None)
            kwargs["action"] = argparse.BooleanOptionalAction
        return super().add_argument(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        raise UserError(f"{self.prog}: {message}")


def _normalise_field_types(options_cls: type) -> None:
    """Resolve string annotations and ``X | None`` so argparse-dataclass understands them."""
    hints = typing.get_type_hints(options_cls)
    for f in dataclasses.fields(options_cls):
        t = hints.get(f.name, f.type)
        if isinstance(t, types.UnionType):
            t = typing.Union[t.__args__]  # noqa: UP007 - argparse-dataclass checks typing.Union
        f.type = t


def build_parser(options_cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    """Build the argparse parser for an options dataclass."""
    _normalise_field_types(options_cls)
    _Parser._options_cls_hint = options_cls  # read by add_argument while the parser is built
    parser = _Parser(
        options_cls,
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


@dataclass
class ToolSpec:
    """How :func:`run_tool` drives one tool.

    ``run(options)`` does the work and returns a dict of results for ``run.json`` (or None).
    ``output_dir(options)`` names the output folder. ``relion_inputs`` maps RELION External job
    input flags (``in_parts``...) to the tool's option names; ``relion_nodes(options)`` lists the
    (path, kind) output nodes to declare, kind being a key of :data:`NODE_TYPES`. Without it, the
    nodes are those ``run`` left in ``options._relion_nodes`` (none if it left none): for tools
    whose outputs are known only once they ran.
    """

    name: str
    doc: str
    options: type
    run: Callable[[Any], dict[str, Any] | None]
    output_dir: Callable[[Any], str | Path | None]
    relion_inputs: dict[str, str] = field(default_factory=dict)
    relion_nodes: Callable[[Any], list[tuple[str, str]]] | None = None
    seed: Callable[[Any], int | None] = lambda o: getattr(o, "seed", None)


def is_relion_external(argv: Sequence[str]) -> bool:
    """True when called the way RELION calls an External job."""
    if any(a.split("=")[0] in RELION_INPUT_FLAGS for a in argv):
        return True
    for i, a in enumerate(argv):
        if a == "--o" and i + 1 < len(argv) and re.search(r"(^|/)External/job\d+/?$", argv[i + 1]):
            return True
    return False


def translate_relion_args(
    argv: Sequence[str], mapping: dict[str, str], options_cls: type
) -> list[str]:
    """Rewrite RELION's ``--in_parts X`` (etc.) into the tool's own options.

    Extra parameters from the External job GUI arrive as ``--<label> <value>``; labels are our option
    names, so they pass through. Input flags a tool does not use are an error naming the flag.
    """
    names = {f.name: f for f in dataclasses.fields(options_cls)}
    out: list[str] = []
    i = 0
    args = list(argv)
    while i < len(args):
        a = args[i]
        key = a.split("=")[0]
        if key == "--pipeline_control":  # RELION's own programs get it; not an option of ours
            i += 1 if "=" in a else 2
            continue
        if key in RELION_INPUT_FLAGS:
            value = a.split("=", 1)[1] if "=" in a else (args[i + 1] if i + 1 < len(args) else "")
            i += 1 if "=" in a else 2
            target = mapping.get(key[2:])
            if target is None:
                raise UserError(f"{key}: this tool takes no such input as a RELION External job")
            if not value:  # RELION passes empty inputs as "" for unused slots
                continue
            flag = names[target].metadata.get("args", [f"--{target}"])[0]
            nargs = names[target].metadata.get("nargs")
            out += [flag, *value.split()] if nargs else [flag, value]
            continue
        out.append(a)
        i += 1
    return out


def write_relion_output_nodes(out_dir: Path, nodes: list[tuple[str, str]]) -> None:
    """Write RELION_OUTPUT_NODES.star declaring both RELION 3.1 and 4/5 node types."""
    from .outputs import write_text_atomic

    lines = [
        "",
        "# version 30001",
        "",
        "data_output_nodes",
        "",
        "loop_",
        "_rlnPipeLineNodeName #1",
        "_rlnPipeLineNodeType #2",
        "_rlnPipeLineNodeTypeLabel #3",
    ]
    for path, kind in nodes:
        number, label = NODE_TYPES[kind]
        # RELION matches nodes by exact name: "External/job005//x.star" would be another node.
        lines.append(f"{os.path.normpath(str(path))} {number} {label}")
    write_text_atomic(out_dir / "RELION_OUTPUT_NODES.star", "\n".join(lines) + "\n\n")


def _raw_output_dir(argv: Sequence[str]) -> Path | None:
    """The ``--o`` folder straight from argv, so a RELION job that fails to parse still gets its marker
    (RELION's pipeliner waits forever for RELION_JOB_EXIT_SUCCESS/FAILURE otherwise)."""
    for i, a in enumerate(argv):
        if a == "--o" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if a.startswith("--o="):
            return Path(a[4:])
    return None


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


def run_tool(spec: ToolSpec, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` for ``spec``, run it, and return the exit status (0 ok, 2 user error)."""
    raw = list(sys.argv[1:] if argv is None else argv)
    external = is_relion_external(raw)
    started = now_iso()
    out_dir: Path | None = _raw_output_dir(raw) if external else None
    options = None
    t0 = time.time()
    try:
        args = translate_relion_args(raw, spec.relion_inputs, spec.options) if external else raw
        parser = build_parser(spec.options, spec.name, spec.doc)
        options = parser.parse_args(args)
        configure(getattr(options, "verbose", False), getattr(options, "quiet", False))
        od = spec.output_dir(options)
        out_dir = Path(od) if od is not None else None
        if external and out_dir is not None:
            for marker in (
                "RELION_JOB_EXIT_SUCCESS",
                "RELION_JOB_EXIT_FAILURE",
                "RELION_JOB_EXIT_ABORTED",
            ):
                (out_dir / marker).unlink(missing_ok=True)
            abort_file = out_dir / "RELION_JOB_ABORT_NOW"

            def _check_abort(path: Path = abort_file) -> None:
                if path.exists():
                    raise JobAborted(f"{path}: abort requested by RELION")

            add_abort_check(_check_abort)
        results = spec.run(options)
        if out_dir is not None:
            results = dict(results or {})
            results.setdefault("seconds", round(time.time() - t0, 3))
            write_provenance(
                out_dir,
                spec.name,
                options,
                raw,
                started,
                now_iso(),
                spec.seed(options),
                extra=results,
            )
            if external:
                nodes = (
                    spec.relion_nodes(options)
                    if spec.relion_nodes
                    else getattr(options, "_relion_nodes", [])
                )
                write_relion_output_nodes(out_dir, nodes)
                _touch(out_dir / "RELION_JOB_EXIT_SUCCESS")
        return 0
    except JobAborted as exc:
        logger.warning(str(exc))
        if out_dir is not None:
            (out_dir / "RELION_JOB_ABORT_NOW").unlink(missing_ok=True)
            _touch(out_dir / "RELION_JOB_EXIT_ABORTED")
        return 1
    except UserError as exc:
        print(f"{spec.name}: error: {exc}", file=sys.stderr)
        if external and out_dir is not None:
            _touch(out_dir / "RELION_JOB_EXIT_FAILURE")
        return 2
    except KeyboardInterrupt:
        print(f"{spec.name}: interrupted", file=sys.stderr)
        return 130
    except BaseException:
        if external and out_dir is not None:
            _touch(out_dir / "RELION_JOB_EXIT_FAILURE")
        raise
    finally:
        clear_abort_checks()
        if os.environ.get("DISCA_DEBUG_TIMING"):
            logger.info("%s finished in %.2f s", spec.name, time.time() - t0)
