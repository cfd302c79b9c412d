"""What `mmdistill --help`, `mmdistill <verb> --help` and tab completion print.

The per-verb help is read from the YAML files the verb composes: its config groups (with the
default marked) come from the defaults lists and the folders of conf/, and its main keys with
their one-line comments from conf/<verb>.yaml and conf/common.yaml. Nothing here repeats a
setting; a key documented in YAML shows up in `--help` as written there.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from mmdistill.config import conf_dir
from mmdistill.errors import UserError

VERBS = {
    "distill": "distil a dataset into budget.pairs pairs, then train students and report recall",
    "train": "train students on the full real training set (the upper-bound row)",
    "evaluate": "re-score a saved distilled set: mmdistill evaluate source=<run or HF export>",
    "buffer": "train expert trajectories for trajectory-matching methods",
    "table": "aggregate run folders into paper-layout tables: mmdistill table <folder>...",
    "export": "PNG grids, captions and heat-maps of a run: mmdistill export <run folder>\n"
    "             (--format hf: a Hugging Face datasets folder with a dataset card)",
    "report": "one self-contained report.html of a run or a sweep: mmdistill report <folder>",
}
JOB_VERBS = ("distill", "train", "evaluate", "buffer")
FOLDER_VERBS = ("table", "export", "report")

USAGE = (
    "usage: mmdistill <verb> [options]    (mmdistill --version, mmdistill <verb> --help)\n\n"
    "job verbs (Hydra apps over conf/<verb>.yaml):\n"
    + "".join(f"  {v:<10} {VERBS[v]}\n" for v in JOB_VERBS)
    + "folder verbs:\n"
    + "".join(f"  {v:<10} {VERBS[v]}\n" for v in FOLDER_VERBS)
    + """
examples:
  mmdistill distill                                   # built-in shapes data, tiny encoder
  mmdistill distill dataset=flickr8k encoder=lite0_minilm method=random budget.pairs=100
  mmdistill distill -m method=random budget.pairs=100,200
  eval "$(mmdistill -sc install=bash)"                # tab completion in this shell
"""
)
KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[a-z_]+):(?P<value>[^#]*)(?:#\s*(?P<doc>.*))?$")


def _defaults(verb: str) -> dict[str, str]:
    """The config groups the verb composes and their default options (None: off)."""
    out: dict[str, str] = {}
    for name in ("common", verb):
        for entry in yaml.safe_load((conf_dir() / f"{name}.yaml").read_text()).get("defaults", []):
            if isinstance(entry, dict):
                for group, option in entry.items():
                    if not group.startswith("hydra") and not group.startswith("override"):
                        out[group.lstrip("/")] = str(option)
    return out


def _keys(path: Path, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, comment) of the plain keys a YAML file sets, two levels deep."""
    out, parent = [], ""
    for line in path.read_text().splitlines():
        m = KEY_LINE.match(line)
        if not m or m["key"] in ("defaults", "verb", "name", "family") or len(m["indent"]) > 2:
            continue
        value, doc = m["value"].strip(), m["doc"] or ""
        if not m["indent"]:
            parent = m["key"]
            if value:
                out.append((prefix + m["key"], value, doc))
        elif value:
            out.append((f"{prefix}{parent}.{m['key']}", value, doc))
    return out


def verb_help(verb: str) -> str:
    """`mmdistill <verb> --help`: what the verb does, its groups and main keys."""
    if verb in FOLDER_VERBS:
        return f"mmdistill {verb}: {VERBS[verb]}\n(options: mmdistill {verb} --help)\n"
    lines = [
        f"usage: mmdistill {verb} [group=option ...] [key=value ...] [-m] [--cfg job]",
        "",
        f"{verb}: {VERBS[verb]}",
        "",
        "config groups (group=option; * marks the default):",
    ]
    root, defaults = conf_dir(), _defaults(verb)
    for group, default in defaults.items():
        folder = root / group
        if folder.is_dir():
            names = sorted(p.stem for p in folder.glob("*.yaml"))
            shown = ", ".join(f"*{n}" if n == default else n for n in names)
            lines.append(f"  {group:<11}{shown}")
    keys = _keys(root / f"{verb}.yaml") + _keys(root / "common.yaml")
    for group in ("eval", "method"):  # the groups whose keys most runs change
        option = defaults.get(group)
        if option and (root / group / f"{option}.yaml").is_file():
            keys += _keys(root / group / f"{option}.yaml", f"{group}.")
    lines += ["", "main keys (key=value; the default, then what it means):"]
    for key, value, doc in keys:
        lines.append(f"  {f'{key}={value}':<29} {doc}".rstrip())
    lines += [
        "",
        f"another option's keys: mmdistill {verb} <group>=<option> --cfg job "
        f"({'method=lors' if verb == 'distill' else 'eval=paper_lors'} --cfg job prints them)",
        "sweeps: -m key=a,b; Hydra's own flags: --hydra-help; every key: docs/cli.md",
    ]
    return "\n".join(lines) + "\n"


def completion_script(shell: str) -> str:
    """A completion function for `mmdistill` itself: verbs at the first word, then the job
    verb's Hydra completion (groups, keys, options) with the verb taken out of the line."""
    verbs = " ".join((*JOB_VERBS, *FOLDER_VERBS, "--help", "--version"))
    jobs = "|".join(JOB_VERBS)
    script = f"""_mmdistill_complete()
{{
    local words=($COMP_LINE) word="${{COMP_WORDS[COMP_CWORD]}}" choices
    if (( COMP_CWORD <= 1 )); then
        COMPREPLY=($(compgen -W "{verbs}" -- "$word"))
        return
    fi
    case "${{words[1]}}" in
        {jobs})
            choices=$(COMP_LINE="${{COMP_LINE/ ${{words[1]}}/}}" COMP_POINT=$COMP_POINT \\
                "${{words[0]}}" "${{words[1]}}" -sc query=bash 2>/dev/null)
            COMPREPLY=($(compgen -o nospace -o default -W "$choices" -- "$word"));;
        *) COMPREPLY=($(compgen -o default -f -- "$word"));;
    esac
}}
COMP_WORDBREAKS=${{COMP_WORDBREAKS//=}}
complete -o nospace -o default -F _mmdistill_complete mmdistill
"""
    if shell == "zsh":
        script = "autoload -Uz bashcompinit && bashcompinit\n" + script
    return script


UNINSTALL = "complete -r mmdistill 2>/dev/null; unset -f _mmdistill_complete\n"


def shell_completion(args: list[str]) -> str | None:
    """The script `-sc install=<shell>` or `-sc uninstall=<shell>` asks for; None for Hydra's
    own queries (`-sc query=bash`, which the script sends with the verb). An unknown shell is
    one line naming the choices."""
    for flag, value in zip(args, args[1:], strict=False):
        what, _, shell = value.partition("=")
        if flag in ("-sc", "--shell-completion") and what in ("install", "uninstall"):
            if shell not in ("bash", "zsh"):
                raise UserError(f"-sc {what}={shell}: choose bash or zsh")
            return completion_script(shell) if what == "install" else UNINSTALL
    return None
