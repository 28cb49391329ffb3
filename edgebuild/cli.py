"""Click commands. Maps errors to exit codes, nothing else.

0 success · 1 internal bug (traceback) · 2 bad input (error: + hint:) · 3 a gate failed
(table) · 130 interrupted.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
import traceback
from pathlib import Path

import click

from . import __version__
from .errors import EdgebuildError, GateFailed


def _fail(err: EdgebuildError, verbose: bool) -> int:
    if isinstance(err, GateFailed) and err.rows:
        head = ("target", "budget", "limit", "limit from", "measured")[: len(err.rows[0])]
        widths = [max(len(str(r[i])) for r in [head, *err.rows]) for i in range(len(head))]
        click.echo("  ".join(h.ljust(w) for h, w in zip(head, widths)), err=True)
        for r in err.rows:
            click.echo("  ".join(str(c).ljust(w) for c, w in zip(r, widths)), err=True)
    click.echo(f"error: {err.message}", err=True)
    if err.hint:
        click.echo(f"hint: {err.hint}", err=True)
    _json_error(err.message, err.hint, err.exit_code, printed=isinstance(err, GateFailed))
    if verbose:
        traceback.print_exception(err)
    return err.exit_code


def _json_error(message: str, hint: str | None, code: int, printed: bool = False) -> None:
    """With --json, the error goes to stdout as JSON too (a script reads one document either
    way); a failed gate has printed report.json already."""
    if "--json" in _ARGV and not printed:
        click.echo(json.dumps({"status": "error", "error": message, "hint": hint, "exit_code": code}, indent=2))


import errno as _errno

_USER_ERRNOS = {_errno.EACCES, _errno.EPERM, _errno.ENOTDIR, _errno.EISDIR, _errno.ENOSPC, _errno.EROFS, _errno.EDQUOT, _errno.ENAMETOOLONG}


class Group(click.Group):
    def invoke(self, ctx):
        verbose = bool(ctx.params.get("verbose")) or os.environ.get("EDGEBUILD_VERBOSE") == "1"
        try:
            return super().invoke(ctx)
        except EdgebuildError as e:
            ctx.exit(_fail(e, verbose))
        except OSError as e:
            # the host refused a path the user gave (output under a file, read-only or full disk):
            # bad input, not a bug; anything else stays exit 1 with its traceback
            if e.errno not in _USER_ERRNOS:
                raise
            from .errors import EdgebuildError as _E

            where = f"{e.filename}: " if e.filename else ""
            err = _E(f"{where}{e.strerror or e}", hint="check the path (is a parent a file?), its permissions and the free disk space; -v shows where it happened")
            err.__traceback__ = e.__traceback__
            ctx.exit(_fail(err, verbose))
        except KeyboardInterrupt:
            click.echo("interrupted: the cache and the previous dist/ are intact", err=True)
            ctx.exit(130)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgebuild")
@click.option("-v", "--verbose", is_flag=True, help="show tracebacks and library warnings")
@click.pass_context
def cli(ctx, verbose):
    """edgebuild: transfer, compress, export, validate and bundle models for edge devices."""
    ctx.obj = {"verbose": verbose}
    if not verbose:
        import warnings

        warnings.formatwarning = _short_warning  # "warning: ..." without the library's file and line
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|onnx|onnxscript|nncf|openvino|transformers).*")


def _short_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def _verbose_first(argv: list[str]) -> list[str]:
    """``-v``/``--verbose`` is a flag of the whole command: accept it anywhere before ``--``."""
    cut = argv.index("--") if "--" in argv else len(argv)
    flags = [a for a in argv[:cut] if a in ("-v", "--verbose")]
    return flags[:1] + [a for a in argv[:cut] if a not in ("-v", "--verbose")] + argv[cut:]


_ARGV: list[str] = []  # the command line main() got: --nproc re-runs it under torchrun


def _argv_without_nproc() -> list[str]:
    out, it = [], iter(_ARGV)
    for a in it:
        if a == "--nproc":
            next(it, None)
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def _torchrun(f):
    """``--nproc N`` starts torchrun with N local processes running this same command; under
    torchrun (WORLD_SIZE/RANK set, by --nproc or by hand) the process joins the group, and every
    rank ends with rank 0's exit status (see edgebuild/distributed.py)."""

    @functools.wraps(f)
    def wrapper(*args, nproc=None, **kwargs):
        from . import distributed

        if distributed.launched():
            if nproc is not None:
                raise click.UsageError("--nproc starts torchrun; under torchrun leave it out")
        elif nproc is not None and nproc > 1:
            raise click.exceptions.Exit(distributed.relaunch(nproc, _argv_without_nproc()))
        else:
            return f(*args, **kwargs)
        distributed.init()
        error = None
        try:
            f(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the group is left
            error = e
        verbose = bool(click.get_current_context().find_root().params.get("verbose")) or os.environ.get("EDGEBUILD_VERBOSE") == "1"
        if error is not None and not verbose and distributed.lost_peers(error):
            click.echo(distributed.lost_peers_message(error), err=True)  # the root cause is another rank's error
            error = click.exceptions.Exit(1)
        code = distributed.finish(distributed.exit_code_of(error))
        if error is not None and (distributed.is_main() or code == distributed.exit_code_of(error)):
            raise error
        if code:
            raise click.exceptions.Exit(code)

    return wrapper


@cli.command()
@click.argument("config", default="edgebuild.yaml", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-t", "--target", "targets", multiple=True, help="target profile (repeatable); default: the build file's targets")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), help="output folder; default: dist/ beside CONFIG")
@click.option("--force", is_flag=True, help="ignore the cache")
@click.option("--json", "as_json", is_flag=True, help="one JSON summary on stdout, no progress bars")
@click.option("--targets-dir", multiple=True, type=click.Path(file_okay=False, path_type=Path), help="extra folder of target profiles")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), envvar="EDGEBUILD_CACHE_DIR", help="stage cache folder")
@click.option("--reproducible", is_flag=True, default=None,
              help="leave host timings out of the bundles so the same inputs give byte-identical archives (implied by SOURCE_DATE_EPOCH)")
@click.option("--emulate", is_flag=True,
              help="validate aarch64 targets under qemu-user in an arm64 Debian root (made once, ~10 min): accuracy and agreement, no latency")
@click.option("--nproc", type=click.IntRange(min=1), help="train on N processes on this machine (runs the build under torchrun)")
@click.option("--dry-run", is_flag=True, help="print the plan (what is cached, what runs and why) and stop")
@click.option("--remeasure", is_flag=True, help="validate again (latency gates, accuracy) on this host; every other stage from the cache")
@click.option("--no-wait", is_flag=True, help="another build holds the output folder or a cache entry: exit 2 naming its PID instead of waiting")
@_torchrun
def build(config, targets, out, force, as_json, targets_dir, cache_dir, reproducible, dry_run, emulate, remeasure, no_wait):
    """Build one validated bundle per target from CONFIG."""
    from .cache import Cache
    from .config import load_build_config
    from .pipeline import Build
    from .progress import Progress

    t0 = time.perf_counter()
    if not os.path.lexists(config):  # a broken link or a loop is named as such by load_build_config
        from .errors import ConfigError

        where = "this folder" if config == Path("edgebuild.yaml") else str(config.parent)
        raise ConfigError(f"no build file: {config} not found in {where}",
                          hint="start one from your images with 'edgebuild init --data PATH' (see README 'Quick start'), or pass the build file: edgebuild build PATH/edgebuild.yaml")
    cfg = load_build_config(config)
    from . import distributed

    progress = Progress("quiet" if as_json or not distributed.is_main() else "auto")
    b = Build(cfg, list(targets) or None, out, Cache(cache_dir, enabled=not force, wait=not no_wait), progress, tuple(targets_dir),
              reproducible=reproducible or None, emulate=emulate, remeasure=remeasure)
    b.wait = not no_wait
    if dry_run:
        plan = b.dry_run()
        if as_json:
            click.echo(json.dumps({"name": cfg.name, "plan": plan}, indent=2))
        return
    try:
        result = b.run()
    except GateFailed:
        if as_json and (b.out / "failed-report.json").is_file():  # the failed build's, not the published one
            click.echo((b.out / "failed-report.json").read_text())
        raise
    if result is None:  # a torchrun worker: rank 0 writes and reports
        return
    report = result.report
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
        return
    _summary(report, b.out)
    for w in report.get("warnings") or []:
        click.echo(f"warning: {w}", err=True)
    for path in result.bundles:
        click.echo(f"bundle: {path}  (+ {path.name}.tar.gz)")
    click.echo(f"built {len(result.bundles)} bundle(s) in {time.perf_counter() - t0:.1f}s; report: {b.out / 'report.html'}")


def _summary(report: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{report['name']} {report['version']} -> {out}")
    for col in ("target", "precision", "accuracy", "agreement", "p50 ms", "size", "status"):
        table.add_column(col, overflow="fold", no_wrap=col in ("precision", "accuracy", "agreement", "p50 ms", "size"))
    for name, t in report["targets"].items():
        m = t["metrics"]
        measured = m.get("status") == "measured"
        emulated = m.get("status") == "emulated"
        table.add_row(
            name, (t.get("precision") or {}).get("effective") or t["profile"]["precision"],
            (f"{m['accuracy']:.4f}" + (f" (test {m['test_accuracy']:.4f})" if m.get("test_accuracy") is not None else "")) if measured or emulated else "-",
            f"{m['agreement']:.4f}" if measured or emulated else "-",
            f"{m['latency_p50_ms']:.3f}" if measured else "-",
            f"{m['size_bytes'] / 1e3:.1f} kB",
            t["status"] if measured else f"{t['status']}: {m['validated']}, latency not measured" if emulated else f"not run: {m.get('reason')}",
        )
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    console.print(table)


@cli.command()
@click.argument("directory", default=".", type=click.Path(file_okay=False, path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), help="image folder: class sub-folders, or train/ and val/ (and test/) folders of them; default: DIR/data")
@click.option("--backbone", metavar="SOURCE", help="python:FILE.py:FUNC | hf:ID_OR_DIR | timm:NAME | torchvision:NAME; default: a small built-in CNN from scratch")
@click.option("--weights", type=click.Path(dir_okay=False, path_type=Path), help="pretrained weights (.safetensors or state-dict .pt)")
@click.option("--target", "targets", multiple=True, metavar="NAME", help="target profile (repeatable); default: every profile this host can run")
def init(directory, data, backbone, weights, targets):
    """Write a commented edgebuild.yaml for the images in --data (never overwrites)."""
    from .scaffold import init as scaffold

    path = scaffold(directory, data, backbone, weights, list(targets))
    click.echo(f"wrote {path}")
    click.echo(f"next: edgebuild build {path if directory != Path('.') else ''}".rstrip() + "   (--dry-run shows the plan first)")


@cli.group()
def targets():
    """Target profiles."""


def _registry(config: Path | None, dirs):
    from .profiles import ProfileRegistry

    extra = list(dirs)
    cfg_path = config or Path("edgebuild.yaml")
    if cfg_path.is_file():
        extra.insert(0, cfg_path.resolve().parent / "targets")
    return ProfileRegistry(extra)


@targets.command("list")
@click.option("-c", "--config", type=click.Path(dir_okay=False, path_type=Path), help="build file whose targets/ folder to include")
@click.option("--targets-dir", multiple=True, type=click.Path(file_okay=False, path_type=Path))
def targets_list(config, targets_dir):
    """Built-in and user profiles, one line each."""
    from .profiles import unavailable_reason

    reg = _registry(config, targets_dir)
    for n in reg.names():
        p = reg.get(n)
        reason = unavailable_reason(p)
        here = "runs here" if reason is None else "not on this host"
        click.echo(f"{n:<32} {reg.origin[n]:<8} {p.runtime:<11} {p.device:<5} {p.arch:<8} {p.precision:<5} {here:<16} {p.description}")


@targets.command("show")
@click.argument("name")
@click.option("-c", "--config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--targets-dir", multiple=True, type=click.Path(file_okay=False, path_type=Path))
def targets_show(name, config, targets_dir):
    """The fully resolved profile NAME (YAML)."""
    import yaml

    reg = _registry(config, targets_dir)
    p = reg.get(name)
    click.echo(f"# {reg.files[name]} ({reg.origin[name]})")
    click.echo(yaml.safe_dump(p.model_dump(mode="json"), sort_keys=False, allow_unicode=True).rstrip())
    from .budgets import profile_defaults

    lines = profile_defaults(p)
    click.echo("# limits: " + ("none set; the build file's budgets apply alone" if not lines else
                               "a build file's budgets override a default, and may only tighten a hard device limit"))
    for line in lines:
        click.echo(f"#   {line}")
    cfg_path = config or Path("edgebuild.yaml")
    last = cfg_path.resolve().parent / "dist" / "report.json"
    if last.is_file():  # what the last build beside the build file measured
        try:
            note = json.loads(last.read_text()).get("targets", {}).get(name, {}).get("slower")
        except (OSError, ValueError, AttributeError):
            note = None
        if note:
            click.echo(f"# last build ({last}): {note}")


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
def verify(bundle):
    """Check a bundle folder or .tar.gz against its manifest checksums."""
    from .verify import verify_bundle

    result = verify_bundle(bundle)
    click.echo(f"ok: {bundle}: {result['files']} files match the manifest ({result['schema']})")


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
@click.option("--emulate", is_flag=True, help="run an aarch64 bundle under qemu-user (self-test and golden agreement; no latency)")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), envvar="EDGEBUILD_CACHE_DIR", help="where the emulation root is kept")
def validate(bundle, as_json, emulate, cache_dir):
    """Re-run a bundle's self-test and benchmark on this host (or under emulation)."""
    from .progress import Progress
    from .verify import validate_bundle

    result = validate_bundle(bundle, emulate=emulate, cache_root=cache_dir, progress=Progress("quiet" if as_json else "auto"))
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(f"selftest: {result['selftest']}" + (f" ({result['validated']})" if result.get("validated") else ""))
        if "golden_agreement" in result:
            click.echo(f"golden agreement {result['golden_agreement']:.4f}, max abs diff {result['golden_max_abs_diff']:.3g}; "
                       f"{result['emulation']['seconds_per_image']:.3f} s per image emulated")
        if result["selftest"] != "passed" and result.get("selftest_output"):
            click.echo(result["selftest_output"], err=True)
        b = result.get("benchmark")
        if not b and result.get("benchmark_reason"):
            click.echo(f"benchmark: {result['benchmark_reason']}")
        if b:
            built = result.get("build_p50_ms")
            click.echo(f"latency p50 {b['p50_ms']:.3f} ms, p90 {b['p90_ms']:.3f} ms over {b['iterations']} runs"
                       + (f" (build host: p50 {built:.3f} ms)" if isinstance(built, (int, float)) else " (build host: not recorded)"))
    if result["selftest"] != "passed":
        sys.exit(3)


from .cli_cache import cache  # noqa: E402 - the cache commands live in their own module

cli.add_command(cache)


def main(argv=None) -> int:
    _ARGV[:] = list(argv) if argv is not None else sys.argv[1:]
    try:
        rv = cli.main(args=_verbose_first(list(_ARGV)), prog_name="edgebuild", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        return 130
    except click.ClickException as e:
        # usage errors keep the one contract of bad input: error: + hint:, exit 2
        from .errors import one_line

        ctx = getattr(e, "ctx", None)
        where = ctx.command_path if ctx is not None else "edgebuild"
        click.echo(f"error: {one_line(e.format_message())}", err=True)
        click.echo(f"hint: see '{where} --help'", err=True)
        _json_error(one_line(e.format_message()), f"see '{where} --help'", 2)
        return 2
    except KeyboardInterrupt:
        click.echo("interrupted: the cache and the previous dist/ are intact", err=True)
        return 130


def main_entry() -> None:
    sys.exit(main())
