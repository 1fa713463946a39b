"""Every ``--flag`` a command's hints name is an option of that command.

A static check over the error sites: each ``raise SomeError(message, hint)``, each
``echo_err("hint: ...")`` and each ``advice.append(...)`` (``inspect``'s fixes) in
``onnxdgh/`` is attributed to the functions that contain it; the functions a command
can reach are found by following calls by name from the command's callback (an
over-approximation: a name reaches every function of that name). A flag in a hint must
then be an option of the command -- unless the hint names another command
(``onnxdgh validate ... --reference``: flags after it are checked against that one), or
the error's message names the same flag (an option the caller gave, echoed back).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import click

import onnxdgh
from onnxdgh.cli import main

_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
_COMMAND = re.compile(r"onnxdgh (generate|quantize|validate|inspect)\b|(torchrun)\b")
# torchrun's own flags, as _FLAG reads them (it stops at "_": --nproc_per_node -> --nproc)
_TORCHRUN_FLAGS = {"--nproc", "--nnodes", "--node", "--rdzv", "--standalone", "--master"}


@dataclass(frozen=True)
class Hint:
    """One hint text (f-string holes as {}) at one error site."""

    where: str
    text: str
    message: str


def _strings(node: ast.AST, assigned: Mapping[str, list[ast.AST]]) -> list[str]:
    """The literal text an expression can take (alternatives of an if-expression or of a variable listed)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        return ["".join(part.value if isinstance(part, ast.Constant) else "{}" for part in node.values)]  # type: ignore[misc]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return [a + b for a in _strings(node.left, assigned) or [""] for b in _strings(node.right, assigned) or [""]]
    if isinstance(node, ast.IfExp):
        return _strings(node.body, assigned) + _strings(node.orelse, assigned)
    if isinstance(node, ast.Name):
        return [text for value in assigned.get(node.id, []) for text in _strings(value, assigned)]
    return []


def _hint_sites(function: ast.AST, where: str, errors: set[str]) -> list[Hint]:
    assigned: dict[str, list[ast.AST]] = {}
    for node in ast.walk(function):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    assigned.setdefault(target.id, []).append(node.value)
    hints: list[Hint] = []
    for node in ast.walk(function):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
        owner = node.func.value.id if isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name) else ""
        if name in errors:
            hint = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "hint"), None)
            message = " ".join(_strings(node.args[0], assigned)) if node.args else ""
            if hint is not None:
                hints += [Hint(where, text, message) for text in _strings(hint, assigned)]
        elif name == "echo_err" and node.args:
            hints += [Hint(where, text, "") for text in _strings(node.args[0], assigned) if text.startswith("hint:")]
        elif name == "append" and owner == "advice" and node.args:
            hints += [Hint(where, text, "") for text in _strings(node.args[0], assigned)]
    return hints


@dataclass
class _Index:
    calls: dict[str, set[str]]
    hints: dict[str, list[Hint]]


def index_sources(sources: Mapping[str, str], errors: set[str]) -> _Index:
    """Functions by name (methods as ``name`` and ``Class.name``), their callees and their hints."""
    calls: dict[str, set[str]] = {}
    hints: dict[str, list[Hint]] = {}
    for module, text in sources.items():
        tree = ast.parse(text)
        classes = {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
        owners: dict[ast.AST, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                for child in node.body:
                    owners[child] = node.name
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            keys = [node.name] + ([f"{owners[node]}.{node.name}"] if node in owners else [])
            callees: set[str] = set()
            for inner in ast.walk(node):
                if isinstance(inner, ast.Call):
                    func = inner.func
                    name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
                    callees.add(name)
                    if name in classes or name[:1].isupper():  # constructing a class runs its checks
                        callees.add(f"{name}.__post_init__")
                        callees.add(f"{name}.__init__")
            found = _hint_sites(node, f"{module}:{node.lineno} {node.name}", errors)
            for key in keys:
                calls.setdefault(key, set()).update(callees)
                hints.setdefault(key, []).extend(found)
    return _Index(calls, hints)


def reachable_hints(index: _Index, root: str) -> list[Hint]:
    """Every hint in a function reachable from ``root`` by calls."""
    seen: set[str] = set()
    todo = [root]
    while todo:
        name = todo.pop()
        if name in seen or name not in index.calls:
            continue
        seen.add(name)
        todo.extend(index.calls[name])
    found: list[Hint] = []
    for name in seen:
        found.extend(index.hints.get(name, []))
    return found


def foreign_flags(hints: Iterable[Hint], command: str, options: Mapping[str, set[str]]) -> list[str]:
    """``where: --flag`` for every flag a hint printed by ``command`` names but no command it names has."""
    problems: list[str] = []
    for hint in hints:
        echoed = set(_FLAG.findall(hint.message))
        # Split at "onnxdgh <command>": each part's flags belong to the command it names.
        owner = command
        position = 0
        parts: list[tuple[str, str]] = []
        for match in _COMMAND.finditer(hint.text):
            parts.append((owner, hint.text[position:match.start()]))
            owner, position = match.group(1) or match.group(2), match.end()
        parts.append((owner, hint.text[position:]))
        for owner, text in parts:
            for flag in _FLAG.findall(text):
                allowed = _TORCHRUN_FLAGS if owner == "torchrun" else options[owner]
                if flag not in allowed and flag not in echoed:
                    problems.append(f"{hint.where}: {flag} ({command} prints it; {owner} has no such option)")
    return sorted(set(problems))


def _options(command: click.Command) -> set[str]:
    flags = {"--help"}
    for param in command.params:
        flags.update(opt for opt in [*getattr(param, "opts", []), *getattr(param, "secondary_opts", [])] if opt.startswith("--"))
    return flags


def _project_index() -> _Index:
    from onnxdgh import errors

    root = Path(onnxdgh.__file__).parent
    sources = {str(path.relative_to(root.parent)): path.read_text(encoding="utf-8") for path in sorted(root.rglob("*.py"))}
    names = {name for name in dir(errors) if name.endswith("Error")} | {"UsageError", "BadParameter"}
    return index_sources(sources, names)


# Sites the call graph reaches but the command cannot trigger, each with the reason.
# An entry that the check no longer finds fails the test, so the list cannot go stale.
UNREACHABLE = {
    # quantize passes only --images/--iterations/--batch-size/--device/--method/--mean/--std/
    # --allow-no-bn to the generator: never a checkpoint, never resume, never ODSL off.
    ("quantize", "onnxdgh/generation/checkpoint.py", "--checkpoint"),
    ("quantize", "onnxdgh/generation/checkpoint.py", "--resume"),
    ("quantize", "onnxdgh/generation/core.py", "--no-odsl"),
    # validate re-raises load_images_npz's errors with its own --data hint (commands/validate.py).
    ("validate", "onnxdgh/fileio.py", "--calib-data"),
}


def test_every_hint_flag_is_an_option_of_the_command_printing_it() -> None:
    index = _project_index()
    # the group imports its commands on first use: ask it for each one
    commands = {name: main.get_command(None, name) for name in main.list_commands(None)}  # type: ignore[arg-type]
    options = {name: _options(command) for name, command in commands.items()}
    assert set(options) == {"generate", "quantize", "validate", "inspect"}
    problems: list[str] = []
    for name, command in commands.items():
        hints = reachable_hints(index, command.callback.__name__)  # type: ignore[union-attr]
        assert hints, f"no hint reachable from {name}: the call graph is broken"
        problems += [f"{name} {problem}" for problem in foreign_flags(hints, name, options)]
    excused = {
        entry for entry in UNREACHABLE
        for problem in problems if problem.startswith(f"{entry[0]} {entry[1]}:") and f": {entry[2]} (" in problem
    }
    assert excused == UNREACHABLE, f"stale UNREACHABLE entries: {UNREACHABLE - excused}"
    left = [p for p in problems if not any(p.startswith(f"{c} {f}:") and f": {flag} (" in p for c, f, flag in UNREACHABLE)]
    assert left == []


def test_the_check_catches_a_foreign_flag() -> None:
    source = '''
def helper():
    raise InvalidInputError("bad value", "use --allow-no-bn or onnxdgh generate --allow-no-bn")

def quantize_command():
    helper()
'''
    index = index_sources({"fake.py": source}, {"InvalidInputError"})
    hints = reachable_hints(index, "quantize_command")
    options = {"quantize": {"--images"}, "generate": {"--allow-no-bn"}, "validate": set(), "inspect": set()}
    problems = foreign_flags(hints, "quantize", options)
    assert len(problems) == 1 and "--allow-no-bn (quantize prints it" in problems[0]
    # The same flag echoed from the error's own message is an option the caller gave.
    echoed = index_sources({"fake.py": source.replace('"bad value"', '"--allow-no-bn is bad"')}, {"InvalidInputError"})
    assert foreign_flags(reachable_hints(echoed, "quantize_command"), "quantize", options) == []
