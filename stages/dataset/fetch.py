"""A verified local copy of a URL: `fetch(url, target, checksum, offline_hint)`.

A file:// URL is used in place (only checked). An http(s) URL is streamed with a progress bar into `target.part`
beside `target`, resumed with a Range request (guarded by If-Range with the server's ETag or Last-Modified, so a
file that changed on the server is not spliced onto an old part), retried with exponential backoff on transient
errors (connection reset or cut short, timeout, HTTP 408/429/5xx), checked against its checksum and only then
renamed to `target`; a verified `target` is reused without a request. An unreachable host is not retried: the
error ends with the caller's `offline_hint`, which says how to run without the network.

A download may not exceed its `limit` (bytes, and the setting that raises them: the download stage passes
data.limits.archive_gb, tools/get_pretrained.py its --max-mb): a file the server announces
as bigger is not requested, and a body that grows past it (a server that streams forever) is cut off and deleted.

Redirects are followed only to http(s) URLs, and never from https down to plain http (urllib alone would follow
one to ftp://, and a downgrade would let anyone on the path change the file); a refused redirect names both
URLs."""

from __future__ import annotations

import errno
import http.client
import os
import re
import socket
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import ParseResult, urljoin, urlparse

from stages.base.runtime import PipelineError, file_digest, first_line, human_size, log, progress

RETRIES = 4          # extra attempts after a transient error (connection reset, timeout, HTTP 5xx)
BACKOFF_S = 1.0      # first wait between attempts; doubles each time (1, 2, 4, 8 s)
TIMEOUT_S = 60.0     # per socket operation, not for the whole transfer
CHUNK_BYTES = 1 << 20


class ByteLimit(NamedTuple):
    """The most a download may be, and the setting a user raises it with (named in the refusal)."""
    bytes: int
    setting: str


_sleep = time.sleep  # tests replace it to retry without waiting


class _Transient(Exception):
    """A network failure worth retrying (the partial download is kept and resumed)."""


class _Offline(Exception):
    """The host cannot be reached at all (no DNS, connection refused, no route): retrying would not help."""


class _SafeRedirects(urllib.request.HTTPRedirectHandler):
    """urllib's redirect handling, refusing redirects to anything but http(s) and from https to http."""

    def http_error_302(self, req: urllib.request.Request, fp: Any, code: int, msg: str,
                       headers: http.client.HTTPMessage) -> Any:
        location = headers.get("Location") or headers.get("URI")
        if location:  # urllib resolves a relative Location against the request's URL the same way
            try:
                check_redirect(req.full_url, urljoin(req.full_url, location), code)
            except PipelineError:
                fp.close()  # the redirect answer's own connection, which urllib closes when it follows one
                raise
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def check_redirect(url: str, location: str, code: int) -> None:
    """PipelineError unless a redirect from `url` to `location` keeps to http(s) without leaving https."""
    old, new = urlparse(url).scheme.lower(), urlparse(location).scheme.lower()
    if new not in ("http", "https"):
        raise PipelineError(f"{url}: the server redirects (HTTP {code}) to {location}, which is not an http(s) "
                            f"URL; only redirects to http and https are followed. Use a URL that serves the file "
                            f"over http(s), or download it yourself and copy it into data/sources/")
    if old == "https" and new == "http":
        raise PipelineError(f"{url}: the server redirects (HTTP {code}) from https to plain http ({location}); "
                            f"refusing the downgrade, which would let anyone on the network path change the file. "
                            f"Use a URL that stays on https, or download it yourself and copy it into "
                            f"data/sources/")


_OPENER = urllib.request.build_opener(_SafeRedirects)


def fetch(url: str, target: Path, checksum: tuple[str, str] | None, offline_hint: str,
          limit: ByteLimit | None = None) -> Path:
    """A local, verified copy of `url`: a file:// URL is used in place; http(s) is downloaded to `target`, at most
    `limit.bytes` of it. `checksum` is (hashlib algorithm, expected hex digest), or None to take the file as it
    comes."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return _local_file(url, parsed, checksum)
    if parsed.scheme not in ("http", "https"):
        raise PipelineError(f"{url}: unsupported URL scheme {parsed.scheme!r}; use http, https or file")
    if checksum and target.is_file():
        if file_digest(target, checksum[0]) == checksum[1]:
            log(f"download: using the verified {target} (delete it to download again)")
            return target
        target.unlink()
    try:
        _download(url, target, checksum, limit)
    except _Offline as error:
        raise PipelineError(f"cannot download {url}: {parsed.hostname} is unreachable ({error}). "
                            f"{offline_hint}") from None
    return target


def _local_file(url: str, parsed: ParseResult, checksum: tuple[str, str] | None) -> Path:
    if parsed.netloc not in ("", "localhost"):
        raise PipelineError(f"{url}: file:// URLs must name a local file (file:///path), not host "
                            f"{parsed.netloc!r}")
    path = Path(urllib.request.url2pathname(parsed.path))
    if not path.is_file():
        raise PipelineError(f"{url}: file not found")
    if checksum:
        _verify(path, checksum, url, delete=False)
    return path


def _download(url: str, target: Path, checksum: tuple[str, str] | None, limit: ByteLimit | None) -> None:
    part = target.with_name(target.name + ".part")
    for attempt in range(RETRIES + 1):
        try:
            _transfer(url, part, limit)
            break
        except _Transient as error:
            if attempt == RETRIES:
                raise PipelineError(f"downloading {url} failed after {RETRIES + 1} attempts ({error}); the partial "
                                    f"download {part} is kept and resumes on the next run") from None
            delay = BACKOFF_S * 2 ** attempt
            log(f"download: {error}; retrying in {delay:g} s")
            _sleep(delay)
    if checksum:
        _verify(part, checksum, url, delete=True)
    os.replace(part, target)
    _validator_file(part).unlink(missing_ok=True)


def _verify(path: Path, checksum: tuple[str, str], url: str, delete: bool) -> None:
    algorithm, expected = checksum
    actual = file_digest(path, algorithm)
    if actual != expected.lower():
        if delete:
            path.unlink(missing_ok=True)
            _validator_file(path).unlink(missing_ok=True)
        what = "deleted it; the next run downloads afresh" if delete else "left the file as it is"
        raise PipelineError(f"{path}: {algorithm.upper()} {actual} does not match the expected {expected} "
                            f"(from {url}): the file is corrupt or not the expected one; {what}")


def _validator_file(part: Path) -> Path:
    """Beside a partial download: the server's ETag or Last-Modified, sent as If-Range when resuming so that a
    file that changed on the server is downloaded afresh instead of being spliced onto the old part."""
    name = part.name[:-len(".part")] if part.name.endswith(".part") else part.name
    return part.with_name(name + ".validator")


# ---------------------------------------------------------------- one attempt


def _transfer(url: str, part: Path, limit: ByteLimit | None) -> None:
    """One attempt: download `url` into `part`, resuming from its current size. Raises _Transient or _Offline
    (retried, or reported), or PipelineError."""
    part.parent.mkdir(parents=True, exist_ok=True)
    offset = part.stat().st_size if part.is_file() else 0
    response = _open(url, _request_headers(part, offset), part)
    if response is None:  # 416 with a part that is already complete
        return
    with response:
        offset, total = _resume_point(response, part, offset)
        if limit is not None and total is not None and total > limit.bytes:
            _discard(part)
            raise PipelineError(f"{url}: the server announces {human_size(total)}, more than the "
                                f"{human_size(limit.bytes)} of {limit.setting}; nothing was downloaded. Raise "
                                f"{limit.setting} if the file is genuine")
        offset = _append_body(response, part, offset, total, url, limit)
    _check_length(part, offset, total)


def _request_headers(part: Path, offset: int) -> dict[str, str]:
    headers = {"User-Agent": "cifar-pipeline-download"}
    validator = _validator_file(part)
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if validator.is_file():
            headers["If-Range"] = validator.read_text(encoding="utf-8").strip()
    return headers


def _resume_point(response: http.client.HTTPResponse, part: Path, offset: int) -> tuple[int, int | None]:
    """Where the body continues `part` (0: from scratch) and the file's total size (None when unknown)."""
    if response.status == 206:
        start, total = _content_range(response.headers.get("Content-Range"))
        if start != offset:
            part.unlink(missing_ok=True)
            raise _Transient(f"the server's answer (Content-Range {response.headers.get('Content-Range')!r}) "
                             f"does not continue at byte {offset}; starting over")
        return offset, total
    # 200: the server ignored Range, or the file changed (If-Range): start from zero
    if offset:
        log("download: the server does not resume this file; starting over")
    length = response.headers.get("Content-Length")
    _save_validator(response, _validator_file(part))
    return 0, int(length) if length and length.isdigit() else None


def _save_validator(response: http.client.HTTPResponse, validator: Path) -> None:
    """Keep what identifies this version of the file (a strong ETag, else Last-Modified) for resuming it."""
    etag = response.headers.get("ETag") or ""
    tag = etag if etag and not etag.startswith("W/") else response.headers.get("Last-Modified") or ""
    if tag:
        validator.write_text(tag, encoding="utf-8")
    else:
        validator.unlink(missing_ok=True)


def _append_body(response: http.client.HTTPResponse, part: Path, offset: int, total: int | None, url: str,
                 limit: ByteLimit | None) -> int:
    """Write the response body into `part` from `offset` on; return the size `part` has reached. A body that
    passes `limit` is cut off there and the part deleted."""
    with open(part, "ab" if offset else "wb") as handle, progress(total, "download", unit="B", initial=offset,
                                                                 unit_scale=True, unit_divisor=1024) as bar:
        while True:
            try:
                block = response.read(CHUNK_BYTES)
            except (http.client.HTTPException, OSError) as error:
                raise _Transient(f"transfer interrupted after {offset} bytes ({_reason(error)})") from None
            if not block:
                return offset
            if limit is not None and offset + len(block) > limit.bytes:
                handle.close()
                _discard(part)
                raise PipelineError(f"{url}: the download passed {human_size(limit.bytes)}, the limit of "
                                    f"{limit.setting}, and was stopped and deleted; raise {limit.setting} if the "
                                    f"file is genuine")
            handle.write(block)
            offset += len(block)
            bar.update(len(block))


def _discard(part: Path) -> None:
    part.unlink(missing_ok=True)
    _validator_file(part).unlink(missing_ok=True)


def _check_length(part: Path, received: int, total: int | None) -> None:
    # http.client does not raise when a connection closes early; the announced length is the only way to know.
    if total is not None and received < total:
        raise _Transient(f"connection closed after {received} of {total} bytes")
    if total is not None and received > total:
        part.unlink(missing_ok=True)
        raise _Transient(f"received {received} bytes, more than the {total} announced; starting over")


def _open(url: str, headers: dict[str, str], part: Path) -> http.client.HTTPResponse | None:
    try:
        return _OPENER.open(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as error:
        return _handle_http_error(url, error, headers, part)
    except urllib.error.URLError as error:
        reason = error.reason
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise PipelineError(f"{url}: TLS certificate check failed ({reason.verify_message or reason})") from None
        if isinstance(reason, (socket.gaierror, ConnectionRefusedError)) or (
                isinstance(reason, OSError) and reason.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH)):
            raise _Offline(_reason(reason)) from None
        raise _Transient(_reason(reason if isinstance(reason, BaseException) else error)) from None
    except (http.client.HTTPException, OSError) as error:  # e.g. RemoteDisconnected, timeouts after connecting
        raise _Transient(_reason(error)) from None


def _handle_http_error(url: str, error: urllib.error.HTTPError, headers: dict[str, str], part: Path) -> None:
    """An HTTP error answer: None when it only says that the part is already complete, otherwise it raises
    (_Transient for answers worth retrying, PipelineError for the rest)."""
    if error.code == 416 and "Range" in headers:
        _, total = _content_range(error.headers.get("Content-Range"), allow_unsatisfied=True)
        if total is not None and headers["Range"] == f"bytes={total}-":
            return None
        # The partial file does not fit the server's file (it changed, or the part is too long): drop it so
        # the next attempt starts from zero instead of sending the same Range request forever.
        part.unlink(missing_ok=True)
        _validator_file(part).unlink(missing_ok=True)
        raise _Transient("the server cannot resume the partial file; starting over") from None
    # urllib's reason for a redirect loop runs over three lines ("... infinite loop." / "The last 30x error
    # message was:" / "Found"): the first one says it
    reason = (str(error.reason).strip().splitlines() or [""])[0]
    if error.code in (408, 429) or error.code >= 500:
        raise _Transient(f"HTTP {error.code} {reason}") from None
    raise PipelineError(f"{url}: HTTP {error.code} {reason}") from None


def _reason(error: BaseException) -> str:
    if isinstance(error, socket.gaierror):
        return f"cannot resolve the host name: {error.strerror or error}"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, (TimeoutError, socket.timeout)):
        return "timed out"
    return first_line(error)


def _content_range(header: str | None, allow_unsatisfied: bool = False) -> tuple[int | None, int | None]:
    """(first byte, total size) from 'bytes 100-199/200' (or 'bytes */200' in a 416 answer)."""
    match = re.fullmatch(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", (header or "").strip())
    if not match or (match.group(1) is None and not allow_unsatisfied):
        return None, None
    start = int(match.group(1)) if match.group(1) is not None else None
    total = int(match.group(2)) if match.group(2) != "*" else None
    return start, total
