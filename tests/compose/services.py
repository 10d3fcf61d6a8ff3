"""compose/compose.yaml read as the processes it describes, to run its services on this machine.

`service_process("tokenizer", env, ports={5556: 15556, 5557: 15557}, replica=2)` gives the
argv (the entrypoint and command, as the container would run them) and the environment of
one replica, with what a container would see made local:

- `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?error}`, `${VAR:+alt}` and `$$`
  interpolated from `env` (what compose reads from the shell and .env);
- `environment:` entries without a value taken from `env`, or left out when it lacks them;
- the other services' host names (frontend, scheduler) and 0.0.0.0 in `tcp://` and `http://`
  addresses, and `--host`, made 127.0.0.1; ports (in those addresses and `--port`) remapped
  through `ports`;
- secrets (/run/secrets/<target>) and bind mounts (the public keys) mapped to their files on
  this machine (PAGODA_KEYS_DIR in `env` points them at a folder of `pagoda keys generate`);
- an entrypoint `sh -c 'exec pagoda ... "$@"' NAME ARGS...` (the tokenizer's, for a member id
  per replica) unwrapped into a plain argv, `${HOSTNAME}` being compose's container name
  `<project>-<service>-<replica>`.

`pagoda_invocations(service)` lists every `pagoda ROLE ARGS...` a service runs (the tests check
each flag against `pagoda ROLE --help`).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_DIR = REPO / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
# compose/Dockerfile's ENTRYPOINT and CMD (tests/compose/test_compose.py checks them).
IMAGE_ENTRYPOINT = ["pagoda"]
IMAGE_CMD = ["--help"]
LOCALHOST = "127.0.0.1"
SECRETS_DIR = "/run/secrets"

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_URL = re.compile(r"^(?P<scheme>[a-z]+)://(?P<host>[^:/]+):(?P<port>\d+)(?P<rest>.*)$")
_SHELLS = ("sh", "/bin/sh", "bash", "/bin/bash")


class InterpolationError(ValueError):
    """A `${VAR:?error}` whose variable is missing, or a malformed `${...}`."""


@dataclass
class ServiceProcess:
    argv: list[str]
    env: dict[str, str]


def load_compose(path: Path = COMPOSE_FILE) -> dict[str, Any]:
    with open(path) as f:
        return yaml.safe_load(f)


# ---- interpolation (the compose specification's) ------------------------------------------


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """`text` with its `${...}` and `$VAR` replaced from `env`, and `$$` made `$`."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] != "$":
            out.append(text[i])
            i += 1
        elif text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("${", i):
            end = _closing_brace(text, i + 2)
            out.append(_substitute(text[i + 2 : end], env))
            i = end + 1
        elif m := _NAME.match(text, i + 1):
            out.append(env.get(m.group(), ""))
            i = m.end()
        else:
            out.append("$")
            i += 1
    return "".join(out)


def _closing_brace(text: str, start: int) -> int:
    depth, i = 1, start
    while i < len(text):
        if text.startswith("$$", i):
            i += 2
            continue
        if text.startswith("${", i):
            depth, i = depth + 1, i + 2
            continue
        if text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise InterpolationError(f"unclosed '${{' in {text!r}")


def _substitute(expr: str, env: Mapping[str, str]) -> str:
    m = _NAME.match(expr)
    if not m:
        raise InterpolationError(f"invalid '${{{expr}}}'")
    name, rest = m.group(), expr[m.end() :]
    value = env.get(name)
    if not rest:
        return value or ""
    for op in (":-", ":?", ":+", "-", "?", "+"):
        if rest.startswith(op):
            arg = rest[len(op) :]
            break
    else:
        raise InterpolationError(f"invalid '${{{expr}}}'")
    missing = not value if op.startswith(":") else value is None
    if op.endswith("-"):
        return interpolate(arg, env) if missing else value  # type: ignore[return-value]
    if op.endswith("?"):
        if missing:
            raise InterpolationError(f"{name}: {interpolate(arg, env) or 'required'}")
        return value  # type: ignore[return-value]
    return "" if missing else interpolate(arg, env)


def interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    """Every string value of a loaded compose file interpolated (keys are left alone, as compose does)."""
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, dict):
        return {k: interpolate_tree(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate_tree(v, env) for v in node]
    return node


# ---- a service's command and environment ----------------------------------------------------


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def raw_argv(service: Mapping[str, Any]) -> list[str]:
    """Entrypoint + command as the container runs them: the image's ENTRYPOINT and CMD unless
    the service sets them (a service's entrypoint drops the image's CMD, as docker does)."""
    if "entrypoint" in service:
        return _as_list(service["entrypoint"]) + _as_list(service.get("command"))
    command = _as_list(service["command"]) if "command" in service else IMAGE_CMD
    return IMAGE_ENTRYPOINT + command


def service_environment(service: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    """`environment:` (mapping or list form); an entry without a value comes from `env`, if there."""
    entries = service.get("environment") or {}
    if isinstance(entries, list):
        entries = dict(e.split("=", 1) if "=" in e else (e, None) for e in entries)
    out = {}
    for name, value in entries.items():
        if value is None:
            if name in env:
                out[name] = env[name]
        else:
            out[name] = str(value).lower() if isinstance(value, bool) else str(value)
    return out


def _shell_words(script: str) -> list[list[str]]:
    """The simple commands of a shell script (split at ; && || |), each a list of words."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token and all(c in "();<>|&" for c in token):
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def _expand(word: str, shell_env: Mapping[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: shell_env.get(m.group(1) or m.group(2), ""), word)


def _is_shell_script(argv: list[str]) -> bool:
    """`sh -c SCRIPT ...` (or `-ec`, `-xc`...)."""
    return len(argv) >= 3 and argv[0] in _SHELLS and argv[1].startswith("-") and argv[1].endswith("c")


def _unwrap_shell(argv: list[str], shell_env: Mapping[str, str]) -> list[str]:
    """`sh -c 'exec WORDS... "$@"' NAME ARGS...` -> WORDS... ARGS...; a plain argv as it is."""
    if not _is_shell_script(argv):
        return argv
    commands = _shell_words(argv[2])
    if len(commands) != 1 or commands[0][0] != "exec":
        raise ValueError(f"not a single `exec` command, cannot run it as one process: {argv[2]!r}")
    positional = argv[4:]
    out: list[str] = []
    for word in commands[0][1:]:
        out += positional if word == "$@" else [_expand(word, shell_env)]
    return out


def _mounts(doc: Mapping[str, Any], service: Mapping[str, Any], compose_dir: Path) -> dict[str, str]:
    """Container path -> host path of each secret and bind mount of a (interpolated) service."""
    mounts = {}
    for secret in service.get("secrets") or []:
        source = secret if isinstance(secret, str) else secret["source"]
        target = source if isinstance(secret, str) else secret.get("target", source)
        target = target if target.startswith("/") else f"{SECRETS_DIR}/{target}"
        mounts[target] = str((compose_dir / doc["secrets"][source]["file"]).resolve())
    for volume in service.get("volumes") or []:
        if isinstance(volume, str):
            parts = volume.split(":")
            source, target = parts[0], parts[1]
            if not source.startswith((".", "/", "~")):
                continue  # a named volume
        elif volume.get("type") == "bind":
            source, target = volume["source"], volume["target"]
        else:
            continue
        mounts[target] = str((compose_dir / Path(source).expanduser()).resolve())
    return mounts


def _localize(argv: list[str], hosts: set[str], ports: Mapping[int, int], mounts: Mapping[str, str]) -> list[str]:
    out = []
    for i, arg in enumerate(argv):
        previous = argv[i - 1] if i else ""
        if (m := _URL.match(arg)) and m["host"] in hosts:
            port = ports.get(int(m["port"]), int(m["port"]))
            arg = f"{m['scheme']}://{LOCALHOST}:{port}{m['rest']}"
        elif previous == "--host" and arg in hosts:
            arg = LOCALHOST
        elif previous == "--port" and arg.isdigit():
            arg = str(ports.get(int(arg), int(arg)))
        else:
            for target, source in mounts.items():
                if arg == target or arg.startswith(target + "/"):
                    arg = source + arg[len(target) :]
                    break
        out.append(arg)
    return out


def service_process(
    name: str,
    env: Mapping[str, str] | None = None,
    *,
    ports: Mapping[int, int] | None = None,
    replica: int = 1,
    pagoda: list[str] | None = None,
    compose_file: Path = COMPOSE_FILE,
) -> ServiceProcess:
    """Replica `replica` of service `name`, made to run here (see the module's docstring).

    `pagoda`: what to run for the `pagoda` command, e.g. `[sys.executable, "-m", "pagoda"]`.
    """
    env = dict(env or {})
    doc = interpolate_tree(load_compose(compose_file), env)
    service = doc["services"][name]
    environment = service_environment(service, env)
    project = doc.get("name") or compose_file.parent.name
    shell_env = {**environment, "HOSTNAME": f"{project}-{name}-{replica}"}
    argv = _unwrap_shell(raw_argv(service), shell_env)
    hosts = set(doc["services"]) | {"0.0.0.0"}
    argv = _localize(argv, hosts, ports or {}, _mounts(doc, service, compose_file.parent))
    if pagoda is not None and argv and argv[0] == "pagoda":
        argv = list(pagoda) + argv[1:]
    return ServiceProcess(argv=argv, env=environment)


def pagoda_invocations(service: Mapping[str, Any]) -> list[list[str]]:
    """The arguments of every `pagoda` command an (interpolated) service runs, role first, shell
    scripts included."""
    argv = raw_argv(service)
    if argv[:1] == ["pagoda"]:
        return [argv[1:]]
    if not _is_shell_script(argv):
        return []
    positional = argv[4:]
    found = []
    for words in _shell_words(argv[2]):
        words = words[1:] if words[0] == "exec" else words
        if words[0] == "pagoda":
            found.append([a for w in words[1:] for a in (positional if w == "$@" else [w])])
    return found
