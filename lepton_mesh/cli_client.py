"""The CLI's client for the admin API: standard library only (urllib), no event loop.

Where the server and token come from, first found wins:
1. `--server` / `--token` flags;
2. the environment: `LEPTON_SERVER`, `LEPTON_TOKEN`;
3. the config file that `lepton-mesh login` writes:
   `$LEPTON_CONFIG`, else `$XDG_CONFIG_HOME/lepton-mesh/config.json`, else
   `~/.config/lepton-mesh/config.json` (`{"server": URL, "token": T}`, mode 0600);
4. the server defaults to http://127.0.0.1:15011; there is no default token.

Every failure is a `ClientError` carrying the exit code the CLI returns
(docs/cli.md): 2 invalid input (the server's 400/404/410/413), 3 server or
connection error, 4 authentication (401/403, or no token), 5 conflict (409).
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import json
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lepton_mesh.policy.endpoint_fields import base_url

__all__ = [
    "DEFAULT_SERVER",
    "EXIT_AUTH",
    "EXIT_CHANGES",
    "EXIT_CONFLICT",
    "EXIT_INVALID",
    "EXIT_OK",
    "EXIT_SERVER",
    "AdminClient",
    "ClientError",
    "Settings",
    "check_url",
    "config_path",
    "resolve",
    "save_config",
]

EXIT_OK = 0
EXIT_CHANGES = 1  # diff: there are changes
EXIT_INVALID = 2  # bad input: files, flags, or the server said 400/404/410/413
EXIT_SERVER = 3  # cannot reach the server, or it failed (5xx)
EXIT_AUTH = 4  # no token, or the server said 401/403
EXIT_CONFLICT = 5  # the server said 409: someone changed the policies first

DEFAULT_SERVER = "http://127.0.0.1:15011"
API = "/api/v1"

_EXIT_BY_STATUS = {400: EXIT_INVALID, 401: EXIT_AUTH, 403: EXIT_AUTH, 404: EXIT_INVALID}
_EXIT_BY_STATUS |= {409: EXIT_CONFLICT, 410: EXIT_INVALID, 413: EXIT_INVALID}


class ClientError(Exception):
    """Something the CLI reports on stderr before exiting with `exit_code`.

    `problems` are the server's, as JSON (`text` is FILE:LINE: PATH: MESSAGE).
    """

    def __init__(
        self,
        message: str,
        exit_code: int,
        *,
        reason: str = "",
        status: int | None = None,
        problems: list[dict[str, Any]] | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.reason = reason
        self.status = status
        self.problems = problems or []
        self.body = body


# --- settings -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Settings:
    server: str
    token: str | None
    token_source: str  # "--token", "LEPTON_TOKEN", the config file's path, or "none"


def config_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get("LEPTON_CONFIG"):
        return Path(env["LEPTON_CONFIG"])
    base = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "lepton-mesh" / "config.json"


def _read_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ClientError(f"{path}: cannot read the CLI config: {e}", EXIT_INVALID) from e
    if not isinstance(data, dict):
        raise ClientError(f"{path}: expected a JSON object", EXIT_INVALID)
    return data


def resolve(
    server: str | None = None, token: str | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """The server and token to use: flags, then environment, then the config file."""
    env = os.environ if env is None else env
    path = config_path(env)
    config: dict[str, Any] | None = None

    def from_config(key: str) -> str | None:
        nonlocal config
        if config is None:  # read only when a flag or variable did not say
            config = _read_config(path)
        value = config.get(key)
        return value if isinstance(value, str) and value else None

    if server:
        url = check_url(server, "--server")
    elif env.get("LEPTON_SERVER"):
        url = check_url(env["LEPTON_SERVER"], "LEPTON_SERVER")
    elif (saved_url := from_config("server")) is not None:
        url = check_url(saved_url, f"{path}: server")
    else:
        url = DEFAULT_SERVER
    if token:
        return Settings(url, token, "--token")
    if env.get("LEPTON_TOKEN"):
        return Settings(url, env["LEPTON_TOKEN"], "LEPTON_TOKEN")
    if (saved := from_config("token")) is not None:
        return Settings(url, saved, str(path))
    return Settings(url, None, "none")


def check_url(url: str, source: str, *, expected: str = "http://HOST:PORT") -> str:
    """`url` as a base URL (http:// added when it has no scheme), or a `ClientError`
    (exit 2) naming `source`: a flag, a variable, a file's field."""
    text, why = base_url(url)
    if why:
        raise ClientError(
            f"{source}: invalid URL {url!r}: {why}; expected {expected}", EXIT_INVALID
        )
    return text


def save_config(path: Path, server: str, token: str) -> None:
    """Write the config atomically, readable by its owner only (it holds a token).

    A `ClientError` (exit 2) if `server` is not a URL or the file cannot be
    written (LEPTON_CONFIG names a folder, no permission); the old file stays.
    """
    server = check_url(server, "--server")
    tmp: str | None = None
    try:
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "this is a folder, not a file")
        if path.parent.exists() and not path.parent.is_dir():  # mkdir would say "File exists"
            raise NotADirectoryError(errno.ENOTDIR, f"{path.parent} is not a folder")
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=".config-", dir=path.parent)  # created 0600
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"server": server, "token": token}, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(e, OSError):
            why = e.strerror or e
            raise ClientError(f"{path}: cannot save the CLI config: {why}", EXIT_INVALID) from None
        raise


# --- the client -------------------------------------------------------------------------


class AdminClient:
    """Synchronous JSON calls to the admin API; errors as `ClientError`."""

    def __init__(self, settings: Settings, *, timeout: float = 30.0) -> None:
        self.settings = settings
        self.timeout = timeout

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        query: Mapping[str, Any] | None = None,
        auth: bool = True,
    ) -> Any:
        url = self.settings.server + API + path
        params = {k: str(v) for k, v in (query or {}).items() if v is not None}
        if params:
            url += "?" + urllib.parse.urlencode(params)
        headers = {"Accept": "application/json"}
        if auth:
            if not self.settings.token:
                raise ClientError(
                    "no token: pass --token, set LEPTON_TOKEN, or run "
                    "'lepton-mesh login --server URL --token TOKEN'",
                    EXIT_AUTH,
                    reason="missing_token",
                )
            headers["Authorization"] = f"Bearer {self.settings.token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raise self._http_error(e) from None
        except http.client.HTTPException:  # a status line that is not HTTP's, a torn body
            raise self._not_the_api("it does not answer HTTP") from None
        except OSError as e:  # URLError, refused, reset, timed out, TLS
            why = getattr(e, "reason", e)
            raise ClientError(
                f"cannot reach the control daemon at {self.settings.server}: {why}",
                EXIT_SERVER,
                reason="connection_failed",
            ) from None
        try:
            answer = json.loads(raw) if raw else None
        except ValueError:
            answer = None
        if not isinstance(answer, dict):  # every answer of the admin API is a JSON object
            raise self._not_the_api("its answer is not a JSON object")
        return answer

    def _not_the_api(self, why: str) -> ClientError:
        return ClientError(
            f"{self.settings.server} is not a lepton-mesh admin API: {why} "
            "(is this the control daemon's admin address?)",
            EXIT_SERVER,
            reason="bad_response",
        )

    def _http_error(self, e: urllib.error.HTTPError) -> ClientError:
        try:
            body = json.loads(e.read())
        except (ValueError, OSError, http.client.HTTPException):
            body = None
        if isinstance(body, dict) and "error" in body:
            message, reason = str(body["error"]), str(body.get("reason", ""))
            problems = body.get("problems") or []
        elif e.code < 500:  # ours answers every error in JSON; a proxy in front may not on 5xx
            return self._not_the_api(f"it answered HTTP {e.code} {e.reason}, not in JSON")
        else:
            message, reason, problems = f"HTTP {e.code} {e.reason}", "", []
        code = _EXIT_BY_STATUS.get(e.code, EXIT_SERVER)
        return ClientError(
            message, code, reason=reason, status=e.code, problems=problems, body=body
        )
