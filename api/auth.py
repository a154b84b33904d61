"""Bearer JWT on every ``/api`` route, and who may reach what.

Keys come from the settings: ``jwt_secret`` for HS* algorithms, ``jwt_public_key`` (PEM)
for RS*/ES*/PS*. Only the algorithms listed in ``jwt_algorithms`` are accepted, and the
key is chosen by the algorithm family, so an HS256 token signed with the RS public key
(the classic confusion attack) never meets that key as an HMAC secret. ``exp`` is
required; ``nbf`` is honoured; ``iss``/``aud`` are checked when configured.

Claims (their names come from the settings ``jwt_claim_sub``/``jwt_claim_org``/
``jwt_claim_role``, by default ``sub``/``org``/``role``): the subject (user id: 1 to
:data:`MAX_SUB_LENGTH` printable characters, as it is written to the audit and job rows),
the organization (a uuid) and the role, a string: ``settings.platform_admin_role``
(default ``platform_admin``, the platform administrator: every organization, the
organization claim may be left out), or one of an organization's roles
:data:`ORG_ROLES`: ``admin`` (that organization's admin), ``member``, ``viewer``. Any
other value (a list, an unknown role, an organization's role without an organization)
is a 401 before anything is written. An organization's admin, member or viewer reaches
only its organization's destinations, projects and jobs; anything else is a 404 that says
nothing about whether it exists. Only the platform administrator reaches every
organization and ``/api/admin/*``; :func:`require_org_admin` lets an organization's admin
(and the platform administrator) approve what needs an admin of that organization.

A token outlives no subject: one whose ``sub`` names a soft-deleted user, or a user of
a soft-deleted (archived) organization, or whose ``org`` names an archived organization,
is refused (401, "no longer active"). The standing of each user and organization is
remembered for :data:`SUBJECT_CACHE_TTL_SECONDS` in this process (no query per request),
so an archive takes effect within that time; :func:`clear_subject_cache` forgets it. A
``sub`` that names no user (a service identity such as ``dev-user``, or a user already
purged from the archive) and the nil organization of a platform administrator's token are
not checked.

A token whose ``exp`` lies more than :data:`MAX_TOKEN_LIFETIME_SECONDS` ahead is refused:
a leaked token must not stay valid for years. :func:`insecure_secret` says when the HMAC
secret is the public built-in default, too short or too predictable
(:func:`core.settings.secret_weakness`); the app refuses to start with one
unless told it is a development setup (:func:`api.create_app`, ``ocore-storage api``).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, TypeGuard

import jwt
from flask import Flask, g, request
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from api.context import db, settings, state
from api.errors import ApiError, not_found
from core.settings import MIN_SECRET_BYTES, Settings, secret_weakness
from db.models import BackupDestination, Job, Organization, Project, User

#: An organization's roles (a token with one of them needs an organization claim): admin:
#: its organization's admin (its organization only, plus what :func:`require_org_admin`
#: allows); member: its organization, reads and writes; viewer: its organization, reads
#: only (no upload, delete, job or archive change).
ORG_ROLES = ("admin", "member", "viewer")
#: The organization's admin role value.
ORG_ADMIN_ROLE = "admin"
#: The default of ``settings.platform_admin_role``: the platform administrator (every
#: organization, /api/admin/*).
DEFAULT_PLATFORM_ADMIN_ROLE: str = Settings.model_fields["platform_admin_role"].default
#: Kept for callers that list roles: the default platform role and the organization roles.
ROLES = (DEFAULT_PLATFORM_ADMIN_ROLE, *ORG_ROLES)
#: what a viewer may send
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: Routes under /api that need no token.
PUBLIC_PATHS = frozenset({"/api/openapi.json"})
ASYMMETRIC_PREFIXES = ("RS", "ES", "PS", "Ed")
#: Longest accepted token lifetime (``exp`` minus now): a week. Tokens of the API tier and
#: ``ocore-storage token`` live an hour; anything far beyond is refused (401).
MAX_TOKEN_LIFETIME_SECONDS = 7 * 24 * 3600
#: Shortest accepted HMAC secret (RFC 7518 3.2: at least the hash size, 256 bits).
MIN_HMAC_SECRET_BYTES = MIN_SECRET_BYTES
#: The development default of ``OCORE_JWT_SECRET`` (public: it is in the source).
DEFAULT_JWT_SECRET: str = Settings.model_fields["jwt_secret"].default
#: Set to 1/true/yes to run with an insecure HMAC secret anyway (local development).
ALLOW_INSECURE_SECRET_ENV = "OCORE_ALLOW_INSECURE_DEV_SECRET"  # noqa: S105 - a variable name
#: How long (seconds) this process remembers whether a user or an organization is still
#: active: a user or organization archived meanwhile is refused at most this much later.
SUBJECT_CACHE_TTL_SECONDS = 30.0
#: Entries kept at most (each a few hundred bytes); past it the expired ones are dropped,
#: then everything.
SUBJECT_CACHE_MAX_ENTRIES = 10_000
#: The organization of a platform administrator's token minted without one.
NIL_ORG = uuid.UUID(int=0)
#: Longest ``sub`` claim (characters): it is written to ``jobs.requested_by``,
#: ``deletion_audit.actor`` and ``pending_deletions.actor``, all ``varchar(200)``.
MAX_SUB_LENGTH = 200


class InsecureSecretError(RuntimeError):
    """The API would accept HS* tokens signed with a public or guessable secret."""


def insecure_secret(cfg: Settings) -> str | None:
    """Why ``cfg`` accepts HMAC tokens with an unsafe secret, or None when it is fine."""
    if not any(alg.upper().startswith("HS") for alg in cfg.jwt_algorithms):
        return None
    if cfg.jwt_secret == DEFAULT_JWT_SECRET:
        return "OCORE_JWT_SECRET is the built-in development secret"
    weakness = secret_weakness(cfg.jwt_secret)  # too short, or too few bits (34 spaces)
    return f"OCORE_JWT_SECRET {weakness}" if weakness else None


def insecure_secret_allowed_by_env() -> bool:
    """``OCORE_ALLOW_INSECURE_DEV_SECRET`` is set to a true value."""
    return os.environ.get(ALLOW_INSECURE_SECRET_ENV, "").strip().lower() in ("1", "true", "yes")


def check_secret(cfg: Settings, allow_insecure: bool) -> str | None:
    """Raise :class:`InsecureSecretError` (a one-line message saying what to set) when the
    secret is unsafe and not allowed; return the warning to print when it is allowed."""
    problem = insecure_secret(cfg)
    if problem is None:
        return None
    if not allow_insecure:
        raise InsecureSecretError(
            f"refusing to start the API: {problem} and HS256 tokens are accepted; set "
            f"OCORE_JWT_SECRET to a random secret of at least {MIN_HMAC_SECRET_BYTES} bytes "
            '(or OCORE_JWT_ALGORITHMS=["RS256"] with OCORE_JWT_PUBLIC_KEY), or for local '
            f"development only pass --dev or set {ALLOW_INSECURE_SECRET_ENV}=1"
        )
    return f"warning: {problem}: anyone can mint tokens this API accepts (development only)"


def roles(cfg: Settings) -> tuple[str, ...]:
    """Every role value a token may carry under ``cfg``: the platform administrator's
    (``cfg.platform_admin_role``) first, then :data:`ORG_ROLES`."""
    return (cfg.platform_admin_role, *ORG_ROLES)


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller. ``platform_admin_role`` is the role value that means
    platform administrator under the settings the token was checked with."""

    sub: str
    org: uuid.UUID
    role: str
    platform_admin_role: str = DEFAULT_PLATFORM_ADMIN_ROLE

    @property
    def is_platform_admin(self) -> bool:
        """The platform administrator: every organization, /api/admin/*, policies and
        approvals of any organization."""
        return self.role == self.platform_admin_role

    @property
    def is_org_admin(self) -> bool:
        """An organization's admin: its own organization only."""
        return self.role == ORG_ADMIN_ROLE

    @property
    def read_only(self) -> bool:
        """A viewer: reads only."""
        return self.role == "viewer"


def _unauthorized(message: str, invalid: bool = True) -> ApiError:
    challenge = 'Bearer realm="ocore"'
    if invalid:
        challenge += ', error="invalid_token"'
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": challenge})


def _key_for(alg: str, cfg: Settings) -> str:
    if alg.startswith("HS"):
        if not cfg.jwt_secret:
            raise _unauthorized("no HMAC secret is configured")
        return cfg.jwt_secret
    if alg.startswith(ASYMMETRIC_PREFIXES):
        if not cfg.jwt_public_key:
            raise _unauthorized("no public key is configured")
        return cfg.jwt_public_key
    raise _unauthorized(f"algorithm {alg!r} is not accepted")


def decode_token(token: str, cfg: Settings) -> dict[str, Any]:
    """Verify a token against the settings and return its claims (401 on any failure)."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as err:
        raise _unauthorized(f"malformed token: {err}") from None
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in cfg.jwt_algorithms or alg.lower() == "none":
        raise _unauthorized(f"algorithm {alg!r} is not accepted")
    options: Any = {"require": ["exp", cfg.jwt_claim_sub], "verify_aud": bool(cfg.jwt_audience)}
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            _key_for(alg, cfg),
            algorithms=[alg],
            options=options,
            audience=cfg.jwt_audience or None,
            issuer=cfg.jwt_issuer or None,
        )
    except jwt.ExpiredSignatureError:
        raise _unauthorized("token expired") from None
    except (jwt.PyJWTError, ValueError, TypeError) as err:
        # InvalidKeyError, bad signature, missing claim, wrong iss/aud, nbf in the future
        raise _unauthorized(f"invalid token: {err}") from None
    # jwt.decode checked that int(exp) works (a number, or a string of digits) and is
    # in the future; the same conversion here
    if int(claims["exp"]) - time.time() > MAX_TOKEN_LIFETIME_SECONDS:
        raise _unauthorized(
            f"token lifetime too long: exp may be at most {MAX_TOKEN_LIFETIME_SECONDS} s ahead"
        )
    return claims


def valid_sub(sub: object) -> TypeGuard[str]:
    """``sub`` is a string of 1 to :data:`MAX_SUB_LENGTH` printable characters
    (:meth:`str.isprintable`: no C0/C1 control such as NUL, newline or ESC, no lone
    surrogate, format, private-use or unassigned character, no line separator, no space
    but the ASCII one)."""
    return isinstance(sub, str) and 0 < len(sub) <= MAX_SUB_LENGTH and sub.isprintable()


def principal_from_claims(claims: dict[str, Any], cfg: Settings | None = None) -> Principal:
    """Check the claims this service relies on (a bad one is 401, never a 500 later), read
    under the names ``cfg.jwt_claim_sub``/``jwt_claim_org``/``jwt_claim_role`` (default
    settings when None): the subject by :func:`valid_sub`; the role a string of
    :func:`roles`; the organization a uuid (kept as :class:`uuid.UUID`), which the
    platform administrator may leave out (:data:`NIL_ORG`). Nothing else of the token
    reaches the database."""
    cfg = cfg if cfg is not None else Settings()
    sub_claim, org_claim, role_claim = cfg.jwt_claim_sub, cfg.jwt_claim_org, cfg.jwt_claim_role
    sub, org, role = claims.get(sub_claim), claims.get(org_claim), claims.get(role_claim)
    if not valid_sub(sub):
        raise _unauthorized(f"claim '{sub_claim}' must be 1-{MAX_SUB_LENGTH} printable characters")
    accepted = roles(cfg)
    if not isinstance(role, str) or role not in accepted:
        raise _unauthorized(f"claim '{role_claim}' must be one of {', '.join(accepted)}")
    platform = role == cfg.platform_admin_role
    try:
        org_id = uuid.UUID(org) if isinstance(org, str) else None
    except ValueError:
        org_id = None
    if org_id is None and platform and org is None:
        org_id = NIL_ORG  # the platform administrator needs no organization
    if org_id is None:
        raise _unauthorized(f"claim '{org_claim}' must be an organization uuid")
    if org_id == NIL_ORG and not platform:
        raise _unauthorized(
            f"claim '{org_claim}' must name an organization: role {role!r} is an "
            "organization's role"
        )
    return Principal(sub=sub, org=org_id, role=role, platform_admin_role=cfg.platform_admin_role)


def _bearer_token() -> str:
    header = request.headers.get("Authorization", "")
    if not header:
        raise _unauthorized("missing Authorization: Bearer token", invalid=False)
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise _unauthorized("the Authorization header must be 'Bearer <token>'")
    return token


class SubjectCache:
    """``key -> (why the subject is inactive, or None; monotonic expiry)``, thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str, uuid.UUID], tuple[str | None, float]] = {}

    def get(self, key: tuple[str, str, uuid.UUID]) -> tuple[bool, str | None]:
        """``(hit, reason)``."""
        now = time.monotonic()
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[1] <= now:
                return False, None
            return True, entry[0]

    def put(self, key: tuple[str, str, uuid.UUID], reason: str | None) -> None:
        now = time.monotonic()
        with self._lock:
            if len(self._entries) >= SUBJECT_CACHE_MAX_ENTRIES:
                self._entries = {k: v for k, v in self._entries.items() if v[1] > now}
                if len(self._entries) >= SUBJECT_CACHE_MAX_ENTRIES:
                    self._entries.clear()
            self._entries[key] = (reason, now + SUBJECT_CACHE_TTL_SECONDS)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_SUBJECTS = SubjectCache()


def clear_subject_cache() -> None:
    """Forget every remembered user and organization standing (tests; after an archive
    that must take effect at once in this process)."""
    _SUBJECTS.clear()


def _user_inactive(session: Session, user_id: uuid.UUID) -> str | None:
    row = session.execute(
        select(User.deleted_at, User.organization_id, Organization.deleted_at)
        .join(Organization, Organization.id == User.organization_id)
        .where(User.id == user_id)
        .execution_options(include_deleted=True)
    ).first()
    if row is None:
        return None  # not a user of this database: a service identity, or purged
    user_deleted, org_id, org_deleted = row
    if user_deleted is not None:
        return f"user {user_id} is archived"
    if org_deleted is not None:
        return f"organization {org_id} of user {user_id} is archived"
    return None


def _organization_inactive(session: Session, org_id: uuid.UUID) -> str | None:
    deleted = session.execute(
        select(Organization.deleted_at)
        .where(Organization.id == org_id)
        .execution_options(include_deleted=True)
    ).first()
    if deleted is not None and deleted[0] is not None:
        return f"organization {org_id} is archived"
    return None


def inactive_reason(engine: Engine, principal: Principal) -> str | None:
    """Why the token's subject is no longer active (its user or an organization it names
    is archived), or None. Each standing comes from :data:`_SUBJECTS` while fresh, else
    from one query (its own short session, never the request's)."""
    try:
        user_id: uuid.UUID | None = uuid.UUID(principal.sub)
    except ValueError:
        user_id = None
    checks: list[tuple[str, uuid.UUID]] = []
    if user_id is not None:
        checks.append(("user", user_id))
    if principal.org != NIL_ORG:
        checks.append(("organization", principal.org))
    where = engine.url.render_as_string(hide_password=True)
    session: Session | None = None
    try:
        for kind, ident in checks:
            key = (where, kind, ident)
            hit, reason = _SUBJECTS.get(key)
            if not hit:
                if session is None:
                    session = Session(bind=engine)
                check = _user_inactive if kind == "user" else _organization_inactive
                reason = check(session, ident)
                _SUBJECTS.put(key, reason)
            if reason is not None:
                return reason
    finally:
        if session is not None:
            session.close()
    return None


def authenticate() -> None:
    """``before_request``: every /api route except the public ones needs a valid token
    whose subject is still active."""
    if request.method == "OPTIONS":
        return
    path = request.path
    if not (path == "/api" or path.startswith("/api/")) or path in PUBLIC_PATHS:
        return
    cfg = settings()
    principal = principal_from_claims(decode_token(_bearer_token(), cfg), cfg)
    reason = inactive_reason(state().engine, principal)
    if reason is not None:
        raise _unauthorized(f"the token's subject is no longer active: {reason}")
    if principal.read_only and request.method not in READ_METHODS:
        raise ApiError(
            403,
            "forbidden",
            "the viewer role only reads: uploading, deleting files and starting jobs need "
            "the member, admin or platform administrator role",
        )
    g.principal = principal


def current_principal() -> Principal:
    """The caller of this request (set by :func:`authenticate`)."""
    principal: Principal | None = g.get("principal")
    if principal is None:  # pragma: no cover - authenticate() ran first
        raise _unauthorized("not authenticated", invalid=False)
    return principal


def require_platform_admin() -> Principal:
    """403 unless the caller is the platform administrator (an organization's admin is
    not: it reaches its own organization only)."""
    principal = current_principal()
    if not principal.is_platform_admin:
        raise ApiError(
            403,
            "forbidden",
            "this endpoint needs the platform administrator role "
            f"({settings().platform_admin_role!r}); an organization's admin, member or "
            "viewer may not call it",
        )
    return principal


def require_org_admin(organization_id: uuid.UUID | None) -> Principal:
    """403 unless the caller is the platform administrator or the admin of this
    organization (call it after the object was found reachable: 404 comes first)."""
    principal = current_principal()
    if principal.is_platform_admin:
        return principal
    if principal.is_org_admin and organization_id is not None and organization_id == principal.org:
        return principal
    raise ApiError(
        403,
        "forbidden",
        "this needs the admin role of the organization (or the platform administrator)",
    )


def can_reach(organization_id: uuid.UUID | None) -> bool:
    """May the caller see an object of this organization? The platform administrator
    every one; anyone else (an organization's admin too) its own only."""
    principal = current_principal()
    if principal.is_platform_admin:
        return True
    return organization_id is not None and organization_id == principal.org


def load_destination(dest_id: uuid.UUID) -> BackupDestination:
    """The destination if the caller may reach it, else 404 (before any storage call)."""
    dest = db().get(BackupDestination, dest_id)
    if dest is None or not can_reach(dest.organization_id):
        raise not_found(f"destination {dest_id} not found")
    return dest


def load_project(project_id: uuid.UUID) -> Project:
    """The (live) project if the caller may reach it, else 404."""
    project = db().scalars(select(Project).where(Project.id == project_id)).first()
    if project is None or not can_reach(project.organization_id):
        raise not_found(f"project {project_id} not found")
    return project


def load_job(job_id: uuid.UUID) -> Job:
    """The job if the caller may reach its destination, else 404."""
    job = db().get(Job, job_id)
    org: uuid.UUID | None = None
    if job is not None and job.destination_id is not None:
        dest = db().get(BackupDestination, job.destination_id)
        org = dest.organization_id if dest is not None else None
    if job is None or not can_reach(org):
        raise not_found(f"job {job_id} not found")
    return job


def init_app(app: Flask) -> None:
    """Authenticate every /api request before its view runs."""
    app.before_request(authenticate)
