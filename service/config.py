"""One frozen Settings object: embedded defaults, then a TOML file, then FACESYM_* environment variables.

Built only by cli.py; every other module receives the values it needs. README has the reference table.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.errors import InvalidParameterError

if TYPE_CHECKING:
    from service.engine.pipeline import EngineParams
    from service.media.limits import DecodeLimits

_AE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: 16 chars, no backslash or control chars


@dataclass(frozen=True)
class Destination:
    """A DICOM peer to send reports to: ``AETITLE@host:port``, or ``AETITLE@host:port+tls`` for DICOM TLS
    (the peer's certificate is verified against ``dicom_tls_ca_file``; FaceSym shows ``dicom_tls_cert``)."""

    ae_title: str
    host: str
    port: int
    tls: bool = False

    @classmethod
    def parse(cls, text: str) -> Destination:
        m = re.fullmatch(r"\s*([^@]+)@([^:@\s]+):(\d+)(\+tls)?\s*", text, re.IGNORECASE)
        if not m or not _AE.match(m.group(1).strip()) or not 0 < int(m.group(3)) < 65536:
            raise InvalidParameterError(f"destination must be AETITLE@host:port[+tls], got {text!r}")
        return cls(m.group(1).strip(), m.group(2), int(m.group(3)), bool(m.group(4)))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}" + ("+tls" if self.tls else "")


#: Settings whose values are (or may hold) secrets themselves: never logged, only a salted slow hash reaches
#: the audit trail (Settings.audit_view). Keys and the web session secret are files: only their paths are
#: settings (dicom_tls_key, web_tls_key, fhir_client_key, audit_syslog_client_key, web_secret_key_file,
#: fhir_token_file).
SECRET_SETTINGS: tuple[str, ...] = ("database_url", "fhir_token", "fhir_base_url")

#: Default task rules: case-insensitive regular expressions over SeriesDescription, ProtocolName,
#: ImageComments and PerformedProcedureStepDescription; the first match wins, else ``auto``.
DEFAULT_TASK_RULES: tuple[tuple[str, str], ...] = (
    ("smile", r"\bsmil(e|ing)\b|\bgrin\b"),
    ("eye_closure", r"\beye[ _-]*clos(e|ure|ing)\b|\bblink|\bclose[ _-]*eyes?\b"),
    ("brow_raise", r"\bbrow|\bforehead|\beyebrow"),
    ("rest", r"\brest\b|\bneutral\b|\brepos"),
)


@dataclass(frozen=True)
class Settings:
    """Every setting of the service. Names map to env vars as FACESYM_<NAME upper-cased>."""

    data_dir: Path = Path("./var")
    database_url: str = ""  # default: sqlite:///<data_dir>/facesym.db
    dicom_host: str = "127.0.0.1"
    dicom_port: int = 11112  # 0: no plain (non-TLS) port
    # DICOM TLS (PS3.15 B.1, BCP 195; TLS 1.2+): the SCP also (or, with dicom_port = 0, only) listens here
    dicom_tls_port: int = 0  # 0: off
    dicom_tls_cert: str = ""  # FaceSym's certificate (PEM file, chain allowed): SCP's and deliveries' cert
    dicom_tls_key: str = ""  # its private key (unencrypted PEM file, readable only by the service's user)
    # CA bundle (PEM file) for DICOM TLS peers: when set, the TLS port requires a client certificate signed
    # by it (others are refused and audited); `+tls` destinations are verified against it (else system CAs)
    dicom_tls_ca_file: str = ""
    ae_title: str = "FACESYM"
    destinations: tuple[Destination, ...] = ()
    quiet_seconds: float = 30.0
    allowed_calling_aes: tuple[str, ...] = ()  # empty: any calling AE title
    max_associations: int = 10
    min_free_disk_mb: int = 1024
    # different bytes, same SOP Instance UID: "version" keeps both, "reject"
    duplicate_policy: str = "version"
    # analyses at once in this process; `facesym serve` with 0: SCP + web only (`facesym worker`s analyse)
    workers: int = 2
    # a claimed job's or delivery's lease, renewed while it runs; once expired, any worker may take it over
    lease_seconds: float = 120.0
    poll_seconds: float = 1.0
    max_attempts: int = 5
    retry_base_seconds: float = 5.0
    retry_max_seconds: float = 600.0
    task_rules: tuple[tuple[str, str], ...] = field(default=DEFAULT_TASK_RULES)
    log_level: str = "INFO"
    # where `facesym demo`'s stand-in PACS listens (0: a free port); `make run` sends reports there too
    demo_receiver_port: int = 11113
    fhir_base_url: str = ""  # FHIR server to POST transaction Bundles to; empty: none
    fhir_token: str = ""  # bearer token for it
    fhir_token_file: str = ""  # or a file holding the token (preferred: keeps it out of the environment)
    fhir_client_cert: str = ""  # mTLS client certificate (PEM) ...
    fhir_client_key: str = ""  # ... and its key
    fhir_ca_file: str = ""  # CA bundle for the server; empty: the system trust store
    fhir_timeout_seconds: float = 30.0
    fhir_drop_dir: str = ""  # also (or instead) write each Bundle here as <identifier>.json
    fhir_patient_identifier_system: str = ""  # empty: IssuerOfPatientID when it is a URI or an OID
    fhir_reference_mode: str = "conditional"  # "conditional" (by identifier) or "logical"
    audit_syslog_host: str = ""  # audit repository (RFC 5424 syslog over TLS, RFC 5425); empty: none
    audit_syslog_port: int = 6514
    audit_syslog_ca_file: str = ""  # CA of the repository's certificate; empty: the system CAs
    audit_syslog_client_cert: str = ""  # optional client certificate (mutual TLS) ...
    audit_syslog_client_key: str = ""  # ... and its key
    audit_source_id: str = ""  # AuditSourceID in every record; empty: facesym@<hostname>
    web_host: str = "127.0.0.1"  # web console and REST API
    web_port: int = 8080  # 0: no web console
    web_tls_cert: str = ""  # with web_tls_key: the console speaks HTTPS only (HSTS, Secure cookies)
    web_tls_key: str = ""  # its private key (unencrypted PEM file)
    web_secret_key_file: str = ""  # session-signing key; empty: <data_dir>/web_secret.key
    web_session_hours: float = 8.0
    # Decode limits (service/media/limits.py), checked before anything is allocated from a size the input
    # states; refused at C-STORE (0xC000 with the reason) when the header already says so, else the
    # instance is reported not analysable. Frames are streamed, so these bound the memory of one analysis.
    max_frame_pixels: int = 4096 * 2160  # width x height of one frame: DCI 4K (and UHD) pass, 8K is refused
    max_frames: int = 5400  # 3 min at 30 frames/s: an exam takes under a minute; ~75 kB kept per frame
    max_file_mb: int = 2048  # one received object or input file (a 3-min 4K H.264 clip is ~1.1 GB)
    max_image_pixels: int = 24_000_000  # one still image (photo, single-frame DICOM): 24 MP passes, 8K not
    # The engine (service/engine/pipeline.py EngineParams; DESIGN.md "Scores"). Activation gate thresholds
    # per task in the task's unit: a0 the noise floor, a1 a full movement (D for smile and brow raise, the
    # eye-area fraction for eye closure). Changing them applies to studies analysed afterwards; the
    # configuration record in the audit trail says when.
    smile_gate_a0: float = 0.02
    smile_gate_a1: float = 0.08
    eye_closure_gate_a0: float = 0.05
    eye_closure_gate_a1: float = 0.30
    brow_raise_gate_a0: float = 0.01
    brow_raise_gate_a1: float = 0.04
    max_yaw_deg: float = 25.0  # quality control: frames turned further are not measured
    max_pitch_deg: float = 25.0
    max_roll_deg: float = 20.0
    flow_k: float = 6.0  # optical-flow symmetry: magnitudes below k x the crop's mean are noise
    flow_lambda: float = 3.8  # SS = clip(1 - lambda |VS_L - VS_R|, 0, 1)
    grader_model_dir: str = ""  # the deep grader's model folder; empty: the model shipped with FaceSym

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'facesym.db').resolve()}"

    def audit_view(self) -> dict[str, Any]:
        """Every setting for the audit trail's configuration record (which keeps only digests of values):
        secret-bearing values (:data:`SECRET_SETTINGS`) become a slow salted hash first, so that even the
        digest is no cheap test of a guessed password or token. Settings that name key files keep the
        path (never the content)."""
        import hashlib

        view: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in SECRET_SETTINGS:
            value = str(view[name])
            if value:
                salt = f"facesym-setting|{name}".encode()
                view[name] = "scrypt:" + hashlib.scrypt(value.encode(), salt=salt, n=2**14, r=8, p=1).hex()
        return view

    @property
    def fhir_targets(self) -> tuple[str, ...]:
        """Delivery destinations for the FHIR Bundle: ``fhir:<base url>`` and/or ``fhir-drop:<folder>``."""
        targets = []
        if self.fhir_base_url:
            targets.append(f"fhir:{self.fhir_base_url}")
        if self.fhir_drop_dir:
            targets.append(f"fhir-drop:{self.fhir_drop_dir}")
        return tuple(targets)

    def read_fhir_token(self) -> str | None:
        if self.fhir_token_file:
            return Path(self.fhir_token_file).read_text().strip() or None
        return self.fhir_token or None

    @property
    def decode_limits(self) -> DecodeLimits:
        from service.media.limits import DecodeLimits

        return DecodeLimits(self.max_frame_pixels, self.max_frames, self.max_file_mb, self.max_image_pixels)

    @property
    def engine_params(self) -> EngineParams:
        """The engine's settings; raises InvalidParameterError (naming the setting) for unusable values."""
        from service.domain import Task
        from service.engine.flow import FlowParams
        from service.engine.pipeline import EngineParams
        from service.engine.quality import QualityLimits
        from service.engine.scores import GateThresholds

        gates = {}
        for task in Task:
            a0, a1 = getattr(self, f"{task.value}_gate_a0"), getattr(self, f"{task.value}_gate_a1")
            try:
                gates[task] = GateThresholds(a0, a1)
            except InvalidParameterError as exc:
                raise InvalidParameterError(f"{task.value}_gate_a0/_a1: {exc}") from None
        for name in ("max_yaw_deg", "max_pitch_deg", "max_roll_deg"):
            if not 0 < getattr(self, name) <= 90:
                raise InvalidParameterError(f"{name} must be in (0, 90] degrees, got {getattr(self, name)}")
        if not (self.flow_k > 0 and self.flow_lambda > 0):
            raise InvalidParameterError(f"flow_k and flow_lambda must be > 0, got {self.flow_k}, "
                                        f"{self.flow_lambda}")
        quality = QualityLimits(max_yaw_deg=self.max_yaw_deg, max_pitch_deg=self.max_pitch_deg,
                                max_roll_deg=self.max_roll_deg)
        flow = FlowParams(k=self.flow_k, lam=self.flow_lambda)
        model = self.grader_model_dir or None
        return EngineParams(gates=gates, quality=quality, flow=flow, grader_model_dir=model)

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"

    def validate(self) -> Settings:
        if not _AE.match(self.ae_title):
            raise InvalidParameterError(f"ae_title must be 1–16 printable characters, got {self.ae_title!r}")
        if not 0 < self.audit_syslog_port < 65536:
            raise InvalidParameterError(f"audit_syslog_port must be 1–65535, got {self.audit_syslog_port}")
        for name in ("dicom_port", "dicom_tls_port"):
            if not 0 <= getattr(self, name) < 65536:
                raise InvalidParameterError(f"{name} must be 0 (off) or 1–65535, got {getattr(self, name)}")
        if not self.dicom_port and not self.dicom_tls_port:
            raise InvalidParameterError("dicom_port and dicom_tls_port are both 0: the SCP would not listen")
        if self.dicom_tls_port and not (self.dicom_tls_cert and self.dicom_tls_key):
            raise InvalidParameterError("dicom_tls_port needs dicom_tls_cert and dicom_tls_key")
        if bool(self.dicom_tls_cert) != bool(self.dicom_tls_key):
            raise InvalidParameterError("dicom_tls_cert and dicom_tls_key must be set together")
        if bool(self.web_tls_cert) != bool(self.web_tls_key):
            raise InvalidParameterError("web_tls_cert and web_tls_key must be set together")
        if not 0 <= self.web_port < 65536:
            raise InvalidParameterError(f"web_port must be 0 (off) or 1–65535, got {self.web_port}")
        if bool(self.audit_syslog_client_cert) != bool(self.audit_syslog_client_key):
            raise InvalidParameterError(
                "audit_syslog_client_cert and audit_syslog_client_key must be set together"
            )
        if self.fhir_reference_mode not in ("conditional", "logical"):
            raise InvalidParameterError(
                f"fhir_reference_mode must be conditional or logical, got {self.fhir_reference_mode!r}"
            )
        if "@" in self.fhir_base_url.split("://", 1)[-1].split("/", 1)[0]:  # not named: it holds a secret
            raise InvalidParameterError("fhir_base_url must not carry a user:password; give the bearer token "
                                        "in fhir_token_file (or FACESYM_FHIR_TOKEN)")
        if bool(self.fhir_client_cert) != bool(self.fhir_client_key):
            raise InvalidParameterError("fhir_client_cert and fhir_client_key must be set together")
        if self.duplicate_policy not in ("version", "reject"):
            raise InvalidParameterError(
                f"duplicate_policy must be version or reject, got {self.duplicate_policy!r}"
            )
        for name in ("quiet_seconds", "poll_seconds", "retry_base_seconds", "retry_max_seconds"):
            if getattr(self, name) < 0:
                raise InvalidParameterError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.workers < 0:
            raise InvalidParameterError(f"workers must be >= 0 (0: receive only), got {self.workers}")
        if self.lease_seconds <= 0:
            raise InvalidParameterError(f"lease_seconds must be > 0, got {self.lease_seconds}")
        for name in ("max_associations", "max_attempts", "max_frame_pixels", "max_frames",
                     "max_file_mb", "max_image_pixels"):
            if getattr(self, name) < 1:
                raise InvalidParameterError(f"{name} must be >= 1, got {getattr(self, name)}")
        _ = self.engine_params  # its checks name the setting
        for task, pattern in self.task_rules:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise InvalidParameterError(f"task_rules: bad pattern for {task!r}: {exc}") from None
        return self


def _coerce(name: str, value: Any) -> Any:
    kind = {f.name: f.type for f in fields(Settings)}[name]
    try:
        if kind == "Path":
            return Path(str(value))
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        if name == "destinations":
            items = value.split(",") if isinstance(value, str) else value
            return tuple(Destination.parse(x) for x in items if str(x).strip())
        if name == "allowed_calling_aes":
            items = value.split(",") if isinstance(value, str) else value
            return tuple(str(x).strip() for x in items if str(x).strip())
        if name == "task_rules":
            if isinstance(value, Mapping):
                return tuple((str(k), str(v)) for k, v in value.items())
            return tuple((str(k), str(v)) for k, v in value)
        return str(value)
    except (TypeError, ValueError) as exc:
        raise InvalidParameterError(f"setting {name}: cannot use {value!r} ({exc})") from None


def load_settings(config_file: str | Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Defaults ← TOML file (a ``[facesym]`` table or top-level keys) ← FACESYM_* environment variables."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    names = {f.name for f in fields(Settings)}
    if config_file:
        path = Path(config_file)
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise InvalidParameterError(f"config file {path}: {exc}") from None
        data = data.get("facesym", data)
        unknown = set(data) - names
        if unknown:
            raise InvalidParameterError(f"config file {path}: unknown settings {sorted(unknown)}")
        values.update({k: _coerce(k, v) for k, v in data.items()})
    for name in names - {"task_rules"}:
        key = f"FACESYM_{name.upper()}"
        if key in env:
            values[name] = _coerce(name, env[key])
    return replace(Settings(), **values).validate()
