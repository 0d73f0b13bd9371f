"""The web console (server-rendered Jinja2 pages) and the JSON REST API, one FastAPI application.

Who may do what: anonymous requests get only ``/login``, ``/healthz``, ``/metrics`` and ``/static``
(pages redirect to ``/login``, API routes answer 401). Viewers read the worklist, study pages and the
system page; operators also re-run analyses and re-send reports; admins also read the audit trail.

Pages use a signed session cookie (HttpOnly, SameSite=Strict) and a CSRF token in every POST form; the
API takes ``Authorization: Bearer <token>`` (``facesym user token USER``) or, for the browser, the
session cookie (POSTs then need the ``X-CSRF-Token`` header). Every study view is audited (110103),
every list or search (110112), every login, logout and failed login (110114; a failure also raises a
110113 security alert), every re-run and re-send (110103, action U) and every refused one (110113).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Form, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker
from starlette.responses import Response

from service.api import data, metrics
from service.api.login_guard import DEVICE_COOKIE, DEVICE_MAX_AGE_S, LoginGuard
from service.api.security import (
    DUMMY_HASH,
    Signer,
    is_safe_next,
    load_or_create_secret,
    token_hash,
    verify_password,
)
from service.audit import (
    MINOR_FAILURE,
    SUCCESS,
    AuditEvent,
    AuditTrail,
    access,
    query,
    security_alert,
    user_authentication,
)
from service.engine import ENGINE_VERSION
from service.store.db import USER_ROLES, User

log = logging.getLogger(__name__)
#: The largest integer a query parameter may carry: SQL INTEGER (SQLite and PostgreSQL bigint) is 64-bit;
#: a larger one used to reach the database and fail there (a 500) instead of a 422.
MAX_SQL_INT = 2**63 - 1

HERE = Path(__file__).parent
SESSION_COOKIE = "facesym_session"
LOGIN_COOKIE = "facesym_login"
#: The SOP class named by the 110112 Query records of console lists (Study Root Query/Retrieve - FIND).
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
ROLE_RANK = {r: i for i, r in enumerate(USER_ROLES)}

CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'none'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")

MESSAGES = {
    "rerun": "Analysis queued again: the workers will pick it up shortly.",
    "resend": "Results queued for sending to every destination again.",
}


@dataclass
class ServiceHooks:
    """What the running service lends the console (all optional).

    ``on_rerun(job_id)`` / ``on_resend(job_id)`` run after the database change (e.g. to wake the
    dispatcher; the scheduler's next tick finds the work anyway); ``extra_versions`` show on the system page.
    """

    engine_version: str = ENGINE_VERSION
    on_rerun: Callable[[int], None] | None = None
    on_resend: Callable[[int], None] | None = None
    extra_versions: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Principal:
    username: str
    role: str
    sid: str = ""  # the session id (empty for a token)
    via: Literal["session", "token"] = "session"

    def can(self, role: str) -> bool:
        return ROLE_RANK.get(self.role, -1) >= ROLE_RANK[role]


class LoginRequired(Exception):
    """An anonymous page request: redirect to /login."""


class Forbidden(Exception):
    def __init__(self, message: str, api: bool) -> None:
        super().__init__(message)
        self.api = api


class _Throttle:
    """At most ``limit`` failed logins per key (user name, client address) in ``window`` seconds."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit, self.window = limit, window
        self._fails: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def _trim(self, key: str, now: float) -> deque[float]:
        q = self._fails[key]
        while q and now - q[0] > self.window:
            q.popleft()
        return q

    def blocked(self, key: str) -> bool:
        with self._lock:
            return len(self._trim(key, time.monotonic())) >= self.limit

    def fail(self, key: str) -> None:
        with self._lock:
            self._trim(key, time.monotonic()).append(time.monotonic())

    def clear(self, key: str) -> None:
        with self._lock:
            self._fails.pop(key, None)


@dataclass
class Web:
    """Everything the routes share."""

    settings: Any
    sessions: sessionmaker[Session]
    audit: AuditTrail
    hooks: ServiceHooks
    signer: Signer
    files_root: Path
    templates: Jinja2Templates
    times: metrics.AnalysisTimes = field(default_factory=metrics.AnalysisTimes)
    #: Failed console logins: progressive delays for unknown clients, none for a user's own browser, and
    #: one audit record per (user, address) and minute (service/api/login_guard.py).
    login_guard: LoginGuard = field(default_factory=LoginGuard)
    #: Unknown API tokens per client address: beyond the limit a 429, and no audit record per request
    #: (one alert when the limit is reached), so the trail cannot be flooded through the token path.
    token_throttle: _Throttle = field(default_factory=lambda: _Throttle(20, 60.0))
    verify_lock: threading.Lock = field(default_factory=threading.Lock)
    verify_cache: tuple[float, dict[str, Any]] | None = None

    @property
    def ae(self) -> str:
        return str(getattr(self.settings, "ae_title", "FACESYM"))

    def record(self, event: AuditEvent) -> None:
        self.audit.record(event)

    def targets(self) -> list[str]:
        return [str(d) for d in getattr(self.settings, "destinations", ())] + list(
            getattr(self.settings, "fhir_targets", ()))


def _ip(request: Request) -> str:
    return request.client.host if request.client else ""


def _with_description(event: AuditEvent, description: str) -> AuditEvent:
    return replace(event, fields={**event.fields, "description": description})


def _secret_path(settings: Any) -> Path:
    configured = str(getattr(settings, "web_secret_key_file", "") or "")
    return Path(configured) if configured else Path(settings.data_dir) / "web_secret.key"


def create_app(
    settings: Any,
    sessions: sessionmaker[Session],
    audit: AuditTrail,
    service_hooks: ServiceHooks | None = None,
) -> FastAPI:
    """The console + API over the service's database and audit trail. ``settings`` is the service's
    Settings (``data_dir``, ``files_dir``, ``destinations``, ``fhir_targets``, ``ae_title`` and the
    optional ``web_secret_key_file`` / ``web_session_hours``)."""
    hours = float(getattr(settings, "web_session_hours", 8.0) or 8.0)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["score"] = lambda x: "—" if x is None else f"{x:.1f}"
    templates.env.filters["num"] = lambda x, n=3: "—" if x is None else f"{x:.{n}f}"
    templates.env.filters["bytes"] = data.human_bytes
    templates.env.filters["when"] = lambda t: "—" if not t else str(t).replace("T", " ")[:19]
    templates.env.filters["dest"] = _dest_label
    templates.env.filters["caption"] = data.figure_caption
    web = Web(
        settings=settings, sessions=sessions, audit=audit, hooks=service_hooks or ServiceHooks(),
        signer=Signer(load_or_create_secret(_secret_path(settings)), hours * 3600.0),
        files_root=Path(getattr(settings, "files_dir", Path(settings.data_dir) / "files")),
        templates=templates,
    )
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        flush_login_summaries(web, everything=True)  # the last minute's failed-login count is not lost

    app = FastAPI(
        lifespan=lifespan,
        title="FaceSym", version=_facesym_version(), openapi_url=None, docs_url=None, redoc_url=None,
        description="FaceSym web console API: studies, scores, audit trail, system state. Authenticate "
                    "with `Authorization: Bearer <token>` (`facesym user token USERNAME`).",
    )
    app.state.web = web
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    _install_handlers(app, web)
    _page_routes(app, web)
    _api_routes(app, web)
    return app


def _facesym_version() -> str:
    from service import __version__

    return __version__


def _dest_label(destination: str) -> str:
    if destination.startswith("fhir-drop:"):
        return "FHIR folder"
    if destination.startswith("fhir:"):
        return "FHIR"
    return destination.split("@", 1)[0]


# --- authentication ------------------------------------------------------------------------------------


def _session_principal(web: Web, request: Request) -> Principal | None:
    s = web.signer.read_session(request.cookies.get(SESSION_COOKIE))
    if s is None:
        return None
    with web.sessions() as db:
        user = db.scalar(select(User).where(User.username == s.username))
    if user is None or user.session_epoch != s.epoch or user.role not in ROLE_RANK:
        return None
    return Principal(user.username, user.role, s.sid, "session")


_bearer = HTTPBearer(auto_error=False, description="An API token from `facesym user token USERNAME`.")


def _install_handlers(app: FastAPI, web: Web) -> None:
    @app.exception_handler(LoginRequired)
    async def _to_login(request: Request, _exc: LoginRequired) -> Response:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={_quote(target)}", status_code=303)

    @app.exception_handler(Forbidden)
    async def _forbidden(request: Request, exc: Forbidden) -> Response:
        if exc.api:
            return JSONResponse({"detail": str(exc)}, status_code=403)
        return _page(web, request, "error.html", {"title": "Not allowed", "message": str(exc)}, None, 403)

    @app.exception_handler(Exception)
    async def _crashed(request: Request, exc: Exception) -> Response:
        # Starlette answers an unhandled exception outside every middleware: the headers are set here
        # (the exception is re-raised afterwards and logged by the server).
        response = PlainTextResponse("Internal Server Error", status_code=500)
        return _security_headers(request, response)

    @app.middleware("http")
    async def _headers(request: Request, call_next: Callable[[Request], Any]) -> Response:
        response: Response = await call_next(request)
        return _security_headers(request, response)


def _security_headers(request: Request, response: Response) -> Response:
    """On every response: CSP (frame-ancestors 'none'), X-Frame-Options, nosniff, Referrer-Policy,
    no caching of pages, and HSTS when the console is served over TLS."""
    response.headers.setdefault("Content-Security-Policy", CSP)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    response.headers.setdefault("X-Frame-Options", "DENY")
    if request.url.scheme == "https":
        response.headers.setdefault("Strict-Transport-Security", "max-age=31536000")
    if not request.url.path.startswith("/static/"):
        response.headers.setdefault("Cache-Control", "no-store")
    return response


def _quote(s: str) -> str:
    from urllib.parse import quote

    return quote(s, safe="/")


def _page_user(request: Request) -> Principal:
    web: Web = request.app.state.web
    p = _session_principal(web, request)
    if p is None:
        raise LoginRequired()
    return p


def _api_user(
    request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal:
    web: Web = request.app.state.web
    if creds is not None and creds.scheme.lower() == "bearer" and creds.credentials:
        with web.sessions() as db:
            user = db.scalar(select(User).where(User.token_hash == token_hash(creds.credentials)))
        if user is not None and user.role in ROLE_RANK:
            return Principal(user.username, user.role, "", "token")  # a valid token is never throttled
        ip, throttle = _ip(request), web.token_throttle
        if throttle.blocked(ip):
            raise HTTPException(429, "too many requests with unknown tokens: wait a minute",
                                headers={"Retry-After": str(int(throttle.window))})
        throttle.fail(ip)
        web.record(user_authentication("login", "unknown", ip, MINOR_FAILURE, local_ae=web.ae,
                                       description="API request with an unknown token"))
        web.record(security_alert("node_authentication", "unknown", ip, local_ae=web.ae,
                                  description="API request with an unknown token"))
        if throttle.blocked(ip):  # this one reached the limit: one record for the rest of the window
            web.record(security_alert(
                "node_authentication", "unknown", ip, local_ae=web.ae,
                description=f"{throttle.limit} unknown API tokens from this address within "
                            f"{throttle.window:.0f} s: further ones refused (429), not audited singly"))
    else:
        p = _session_principal(web, request)
        if p is not None:
            if request.method not in ("GET", "HEAD") and not web.signer.check_csrf(
                    p.sid, request.headers.get("x-csrf-token")):
                raise HTTPException(403, "missing or wrong X-CSRF-Token header")
            return p
    raise HTTPException(401, "authentication required", headers={"WWW-Authenticate": "Bearer"})


PageUser = Annotated[Principal, Depends(_page_user)]
ApiUser = Annotated[Principal, Depends(_api_user)]


def _require(web: Web, request: Request, who: Principal, role: str, what: str, api: bool) -> None:
    if who.can(role):
        return
    web.record(security_alert("restricted_function", who.username, _ip(request), local_ae=web.ae,
                              description=f"{what} refused: role {who.role}"))
    raise Forbidden(f"{what} needs the {role} role (you are {who.role})", api)


def _page(web: Web, request: Request, name: str, ctx: dict[str, Any], who: Principal | None,
          status: int = 200) -> HTMLResponse:
    base = {"user": who, "csrf": web.signer.csrf_token(who.sid) if who and who.sid else "",
            "nav": name.split(".")[0]}
    return web.templates.TemplateResponse(request, name, {**base, **ctx}, status_code=status)


def _check_form_csrf(web: Web, who: Principal, token: str) -> None:
    if not web.signer.check_csrf(who.sid, token):
        raise HTTPException(403, "the form has expired or did not come from this site (CSRF check failed)")


# --- pages ---------------------------------------------------------------------------------------------


def _page_routes(app: FastAPI, web: Web) -> None:  # noqa: C901 - one function per page is clearer
    @app.get("/login", include_in_schema=False)
    def login_form(request: Request, next: str = "/") -> Response:  # noqa: A002
        import secrets

        nonce = secrets.token_urlsafe(16)
        resp = _page(web, request, "login.html", {
            "next": next if is_safe_next(next) else "/",
            "login_csrf": web.signer.csrf_token("login:" + nonce),
            "error": "",  # login errors are rendered by the POST itself, never taken from the URL
        }, None)
        _set_cookie(request, resp, LOGIN_COOKIE, web.signer.sign({"n": nonce}), 600)
        return resp

    @app.post("/login", include_in_schema=False)
    def login(
        request: Request,
        username: Annotated[str, Form()] = "",
        password: Annotated[str, Form()] = "",
        csrf_token: Annotated[str, Form()] = "",
        next: Annotated[str, Form()] = "/",  # noqa: A002
    ) -> Response:
        ip, username = _ip(request), username.strip()[:64]
        pre = web.signer.unsign(request.cookies.get(LOGIN_COOKIE, ""))
        nonce = str(pre.get("n", "")) if pre else ""
        if not nonce or not web.signer.check_csrf("login:" + nonce, csrf_token):
            return _login_again(web, request, next, "The login form expired; please try again.", 403)
        flush_login_summaries(web)
        device = bool(username) and _device_user(web, request) == username.lower()
        wait = web.login_guard.wait_seconds(username, ip, device=device)
        if wait > 0:  # too early after repeated failures: refused without looking at the password
            seconds = max(1, math.ceil(wait))
            _login_failed(web, username, ip, f"too many failed logins: asked to wait {seconds} s")
            refused = _login_again(web, request, next,
                                   f"Too many failed attempts; try again in {seconds} s.", 429)
            refused.headers["Retry-After"] = str(seconds)
            return refused
        with web.sessions() as db:
            user = db.scalar(select(User).where(User.username == username)) if username else None
        ok = verify_password(password, user.password_hash if user else DUMMY_HASH) and user is not None
        if not ok or user is None or user.role not in ROLE_RANK:
            web.login_guard.failed(username, ip, device=device)
            _login_failed(web, username, ip, "wrong user name or password")
            return _login_again(web, request, next, "Wrong user name or password.", 401)
        web.login_guard.succeeded(username, device=device)
        web.record(user_authentication("login", user.username, ip, SUCCESS, local_ae=web.ae,
                                       description=f"console login (role {user.role})"))
        resp = RedirectResponse(next if is_safe_next(next) else "/", status_code=303)
        _set_cookie(request, resp, SESSION_COOKIE, web.signer.new_session(user.username, user.session_epoch),
                    int(web.signer.max_age))
        resp.delete_cookie(LOGIN_COOKIE, path="/")
        # This browser is now a known client of this user: never delayed by others' failed attempts.
        _set_cookie(request, resp, DEVICE_COOKIE,
                    web.signer.sign({"d": user.username.lower(), "t": time.time()}), DEVICE_MAX_AGE_S)
        return resp

    @app.post("/logout", include_in_schema=False)
    def logout(request: Request, who: PageUser, csrf_token: Annotated[str, Form()] = "") -> Response:
        _check_form_csrf(web, who, csrf_token)
        with web.sessions.begin() as db:
            user = db.scalar(select(User).where(User.username == who.username))
            if user is not None:
                user.session_epoch += 1  # ends this user's sessions everywhere
        web.record(user_authentication("logout", who.username, _ip(request), SUCCESS, local_ae=web.ae))
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(SESSION_COOKIE, path="/")
        return resp

    @app.get("/", include_in_schema=False)
    def worklist(
        request: Request, who: PageUser, state: str = "", q: str = "",
        page: Annotated[int, Query(ge=1, le=100000)] = 1,
    ) -> Response:
        state = state if state in data.JOB_STATES or state == "NONE" else ""
        q = q.strip()[:64]
        per_page = 50
        with web.sessions() as db:
            rows, total = data.list_studies(db, state=state, q=q, limit=per_page,
                                            offset=(page - 1) * per_page)
        web.record(query(who.username, _ip(request), STUDY_ROOT_FIND,
                         json.dumps({"view": "worklist", "state": state, "q": q, "page": page}),
                         local_ae=web.ae))
        return _page(web, request, "worklist.html", {
            "rows": rows, "total": total, "state": state, "q": q, "page": page,
            "pages": max(1, -(-total // per_page)), "states": data.JOB_STATES,
        }, who)

    @app.get("/studies/{study_uid}", include_in_schema=False)
    def study_page(
        request: Request, who: PageUser, study_uid: str, msg: str = "", error: str = ""
    ) -> Response:
        with web.sessions() as db:
            detail = data.study_detail(db, study_uid, web.files_root)
        if detail is None:
            return _page(web, request, "error.html", {"title": "No such study", "message": study_uid[:80]},
                         who, 404)
        web.record(access(who.username, _ip(request), study_uid, local_ae=web.ae))
        return _page(web, request, "study.html", {
            "s": detail, "message": MESSAGES.get(msg, ""), "error": data.ACTION_ERRORS.get(error, ""),
        }, who)

    @app.get("/studies/{study_uid}/figures/{name}", include_in_schema=False)
    def figure(who: PageUser, study_uid: str, name: str) -> Response:
        if not data.FIGURE_NAME.match(name) or "/" in study_uid or ".." in study_uid:
            raise HTTPException(404)
        path = data.figures_dir(web.files_root, study_uid) / name
        if not path.is_file():
            raise HTTPException(404)
        return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})

    def _action(request: Request, who: PageUser, study_uid: str, csrf_token: str,
                which: Literal["rerun", "resend"]) -> Response:
        _check_form_csrf(web, who, csrf_token)
        what = "re-run analysis" if which == "rerun" else "re-send results"
        _require(web, request, who, "operator", what.capitalize(), api=False)
        try:
            _do_action(web, request, who, study_uid, which)
        except data.ActionError as exc:
            if exc.status == 404:
                raise HTTPException(404, str(exc)) from None
            return RedirectResponse(f"/studies/{_quote(study_uid)}?error={exc.code}", status_code=303)
        return RedirectResponse(f"/studies/{_quote(study_uid)}?msg={which}", status_code=303)

    @app.post("/studies/{study_uid}/rerun", include_in_schema=False)
    def rerun_form(request: Request, who: PageUser, study_uid: str,
                   csrf_token: Annotated[str, Form()] = "") -> Response:
        return _action(request, who, study_uid, csrf_token, "rerun")

    @app.post("/studies/{study_uid}/resend", include_in_schema=False)
    def resend_form(request: Request, who: PageUser, study_uid: str,
                    csrf_token: Annotated[str, Form()] = "") -> Response:
        return _action(request, who, study_uid, csrf_token, "resend")

    @app.get("/audit", include_in_schema=False)
    def audit_page(
        request: Request, who: PageUser, study_uid: str = "", user: str = "", event_id: str = "",
        before: Annotated[int | None, Query(ge=0, le=MAX_SQL_INT)] = None,
    ) -> Response:
        _require(web, request, who, "admin", "Reading the audit trail", api=False)
        study_uid, user, event_id = study_uid.strip()[:64], user.strip()[:64], event_id.strip()[:16]
        with web.sessions() as db:
            records = data.list_audit(db, study_uid=study_uid, user=user, event_id=event_id, limit=100,
                                      before_seq=before)
        web.record(query(who.username, _ip(request), STUDY_ROOT_FIND, json.dumps(
            {"view": "audit", "study_uid": study_uid, "user": user, "event_id": event_id}), local_ae=web.ae))
        return _page(web, request, "audit.html", {
            "records": records, "study_uid": study_uid, "user_filter": user, "event_id": event_id,
            "verify": _verify(web), "events": data.EVENT_NAMES,
            "older": records[-1]["seq"] if len(records) == 100 else None,
        }, who)

    @app.get("/system", include_in_schema=False)
    def system_page(request: Request, who: PageUser) -> Response:
        with web.sessions() as db:
            info = data.system_info(db, _system_ctx(web))
        web.record(query(who.username, _ip(request), STUDY_ROOT_FIND, json.dumps({"view": "system"}),
                         local_ae=web.ae))
        return _page(web, request, "system.html", {"info": info, "verify": _verify(web)}, who)

    @app.get("/healthz", tags=["monitoring"], summary="Liveness: the database answers (no authentication)")
    def healthz() -> JSONResponse:
        try:
            with web.sessions() as db:
                db.execute(text("SELECT 1"))
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            return JSONResponse({"status": "error", "error": type(exc).__name__}, status_code=503)
        return JSONResponse({"status": "ok", "version": _facesym_version()})

    @app.get("/metrics", tags=["monitoring"], response_class=PlainTextResponse,
             summary="Prometheus metrics (text format 0.0.4; counts only, no authentication)")
    def metrics_route() -> Response:
        with web.sessions() as db:
            body = metrics.render(db, web.times)
        return Response(body, media_type=metrics.CONTENT_TYPE)


def _set_cookie(request: Request, resp: Response, name: str, value: str, max_age: int) -> None:
    # SameSite=Strict, not Lax: nothing signs in across sites (no SSO redirect comes back to us), so the only
    # cost is that a link from another site (an EHR, an e-mail) shows the login page first; Lax would
    # still send the session on such top-level GETs, and every GET here is an audited view of patient data.
    resp.set_cookie(name, value, max_age=max_age, path="/", httponly=True, samesite="strict",
                    secure=request.url.scheme == "https")


def _login_again(web: Web, request: Request, next_url: str, error: str, status: int) -> Response:
    import secrets

    nonce = secrets.token_urlsafe(16)
    resp = _page(web, request, "login.html", {
        "next": next_url if is_safe_next(next_url) else "/",
        "login_csrf": web.signer.csrf_token("login:" + nonce), "error": error,
    }, None, status)
    _set_cookie(request, resp, LOGIN_COOKIE, web.signer.sign({"n": nonce}), 600)
    return resp


def _login_failed(web: Web, username: str, ip: str, why: str) -> None:
    """The first failure of a (user, address) in a minute is recorded (110114 failure + 110113 alert);
    the minute's further ones are counted into one record (:func:`flush_login_summaries`)."""
    if not web.login_guard.audit_failure(username, ip):
        return
    web.record(user_authentication("login", username or "unknown", ip, MINOR_FAILURE, local_ae=web.ae,
                                   description=f"console login failed: {why}"))
    web.record(security_alert("node_authentication", username or "unknown", ip, local_ae=web.ae,
                              description=f"console login failed: {why}"))


def flush_login_summaries(web: Web, *, everything: bool = False) -> None:
    """One 110114 record per (user, address) minute that had more failed logins than its first
    (PS3.15 A.5.3: repeated events may be aggregated). ``everything`` at shutdown."""
    for name, ip, count, span in web.login_guard.due_summaries(all_windows=everything):
        web.record(user_authentication(
            "login", name or "unknown", ip, MINOR_FAILURE, local_ae=web.ae,
            description=f"console login failed {count} more time(s) in {span:.0f} s (aggregated)"))


def _device_user(web: Web, request: Request) -> str:
    """The user name of this browser's device cookie, if it is ours and not older than its lifetime."""
    data = web.signer.unsign(request.cookies.get(DEVICE_COOKIE, ""))
    try:
        if data and 0 <= time.time() - float(data["t"]) <= DEVICE_MAX_AGE_S:
            return str(data["d"])
    except (KeyError, TypeError, ValueError):
        pass
    return ""


def _verify(web: Web) -> dict[str, Any]:
    """``audit verify`` for the pages; walked at most every 30 s (it reads every record)."""
    with web.verify_lock:
        hit = web.verify_cache
        if hit and time.monotonic() - hit[0] < 30:
            return hit[1]
        r = web.audit.verify()
        out = {"ok": r.ok, "count": r.count, "first_broken_seq": r.first_broken_seq, "reason": r.reason,
               "checked_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        web.verify_cache = (time.monotonic(), out)
        return out


def _system_ctx(web: Web) -> data.SystemContext:
    return data.SystemContext(
        data_dir=Path(web.settings.data_dir), destinations=tuple(web.targets()),
        engine_version=web.hooks.engine_version, extra_versions=tuple(web.hooks.extra_versions.items()),
    )


def _do_action(web: Web, request: Request, who: Principal, study_uid: str,
               which: Literal["rerun", "resend"]) -> dict[str, Any]:
    ip = _ip(request)
    try:
        with web.sessions.begin() as db:
            if which == "rerun":
                job_id, n = data.rerun(db, study_uid), 0
            else:
                job_id, n = data.resend(db, study_uid, web.targets())
    except data.ActionError as exc:
        if exc.status != 404:
            web.record(_with_description(
                access(who.username, ip, study_uid, action="U", outcome=MINOR_FAILURE, local_ae=web.ae),
                f"{which} refused: {exc}"))
        raise
    what = "re-run analysis requested" if which == "rerun" else f"re-send to {n} destination(s) requested"
    web.record(_with_description(access(who.username, ip, study_uid, action="U", local_ae=web.ae),
                                 f"{what} (job {job_id})"))
    hook = web.hooks.on_rerun if which == "rerun" else web.hooks.on_resend
    if hook is not None:
        try:
            hook(job_id)
        except Exception:  # noqa: BLE001 - the database change stands; the scheduler finds it anyway
            log.exception("%s hook failed for job %d", which, job_id)
    return {"study_uid": study_uid, "job_id": job_id, "action": which,
            **({"deliveries": n} if which == "resend" else {})}


# --- the JSON API --------------------------------------------------------------------------------------


def _api_routes(app: FastAPI, web: Web) -> None:
    @app.get("/api/openapi.json", include_in_schema=False)
    def openapi(_who: ApiUser) -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/api/v1/studies", tags=["studies"], summary="Studies, newest first (audited as a query)")
    def api_studies(
        request: Request, who: ApiUser, state: str = "", q: str = "",
        limit: Annotated[int, Query(ge=1, le=500)] = 100,
        offset: Annotated[int, Query(ge=0, le=MAX_SQL_INT)] = 0,
    ) -> dict[str, Any]:
        if state and state not in data.JOB_STATES and state != "NONE":
            raise HTTPException(422, f"state must be one of {', '.join(data.JOB_STATES)} or NONE")
        with web.sessions() as db:
            rows, total = data.list_studies(db, state=state, q=q.strip()[:64], limit=limit, offset=offset)
        web.record(query(who.username, _ip(request), STUDY_ROOT_FIND, json.dumps(
            {"view": "api/studies", "state": state, "q": q[:64], "limit": limit, "offset": offset}),
            local_ae=web.ae))
        return {"total": total, "limit": limit, "offset": offset, "studies": rows}

    @app.get("/api/v1/studies/{study_uid}", tags=["studies"],
             summary="One study: scores, QC, deliveries, earlier studies (audited as an access)")
    def api_study(request: Request, who: ApiUser, study_uid: str) -> dict[str, Any]:
        with web.sessions() as db:
            detail = data.study_detail(db, study_uid, web.files_root)
        if detail is None:
            raise HTTPException(404, "no such study")
        web.record(access(who.username, _ip(request), study_uid, local_ae=web.ae))
        detail["figure_urls"] = [f"/studies/{study_uid}/figures/{n}" for n in detail["figures"]]
        return detail

    def _api_action(request: Request, who: Principal, study_uid: str,
                    which: Literal["rerun", "resend"]) -> dict[str, Any]:
        what = "Re-run analysis" if which == "rerun" else "Re-send results"
        _require(web, request, who, "operator", what, api=True)
        try:
            return _do_action(web, request, who, study_uid, which)
        except data.ActionError as exc:
            raise HTTPException(exc.status, str(exc)) from None

    @app.post("/api/v1/studies/{study_uid}/rerun", tags=["actions"],
              summary="Queue the study's analysis again (operator, admin; audited)")
    def api_rerun(request: Request, who: ApiUser, study_uid: str) -> dict[str, Any]:
        return _api_action(request, who, study_uid, "rerun")

    @app.post("/api/v1/studies/{study_uid}/resend", tags=["actions"],
              summary="Send the study's report to every destination again (operator, admin; audited)")
    def api_resend(request: Request, who: ApiUser, study_uid: str) -> dict[str, Any]:
        return _api_action(request, who, study_uid, "resend")

    @app.get("/api/v1/audit", tags=["audit"], summary="Audit records, newest first, and the chain's status "
                                                      "(admin; audited as a query)")
    def api_audit(
        request: Request, who: ApiUser, study_uid: str = "", user: str = "", event_id: str = "",
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        before: Annotated[int | None, Query(ge=0, le=MAX_SQL_INT)] = None,
    ) -> dict[str, Any]:
        _require(web, request, who, "admin", "Reading the audit trail", api=True)
        with web.sessions() as db:
            records = data.list_audit(db, study_uid=study_uid[:64], user=user[:64], event_id=event_id[:16],
                                      limit=limit, before_seq=before)
        web.record(query(who.username, _ip(request), STUDY_ROOT_FIND, json.dumps(
            {"view": "api/audit", "study_uid": study_uid[:64], "user": user[:64], "event_id": event_id[:16]}),
            local_ae=web.ae))
        return {"verify": _verify(web), "records": records}

    @app.get("/api/v1/system", tags=["system"],
             summary="Queue depth, failed jobs, destinations' health, disk use, versions")
    def api_system(request: Request, who: ApiUser) -> dict[str, Any]:
        with web.sessions() as db:
            info = data.system_info(db, _system_ctx(web))
        web.record(query(who.username, _ip(request), STUDY_ROOT_FIND, json.dumps({"view": "api/system"}),
                         local_ae=web.ae))
        info["audit"] = _verify(web)
        return info
