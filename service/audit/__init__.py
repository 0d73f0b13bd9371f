"""The audit trail: DICOM PS3.15 A.5 audit messages (events), a hash-chained append-only store in the
service database (trail), optional RFC 5424/5425 syslog-over-TLS forwarding (syslog), and the
``facesym audit verify|export`` commands (commands). conformance/audit-events.md lists the events."""

from service.audit.events import (
    MAJOR_FAILURE,
    MINOR_FAILURE,
    SERIOUS_FAILURE,
    SUCCESS,
    AuditEvent,
    access,
    analysis_event,
    application_activity,
    config_change,
    export,
    instances_imported,
    instances_transferred,
    query,
    security_alert,
    user_authentication,
)
from service.audit.syslog import SyslogForwarder, forwarder_from_settings
from service.audit.trail import AuditTrail, TransferCollector, VerifyResult

__all__ = [
    "MAJOR_FAILURE",
    "MINOR_FAILURE",
    "SERIOUS_FAILURE",
    "SUCCESS",
    "AuditEvent",
    "AuditTrail",
    "SyslogForwarder",
    "TransferCollector",
    "VerifyResult",
    "access",
    "analysis_event",
    "application_activity",
    "config_change",
    "export",
    "forwarder_from_settings",
    "instances_imported",
    "instances_transferred",
    "query",
    "security_alert",
    "user_authentication",
]
