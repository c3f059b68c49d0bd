"""sqlalchemy-cmk: Customer Managed Keys for SQLAlchemy.

Per-tenant envelope encryption of chosen columns: each value is encrypted with AES-256-GCM under a
data key that the tenant's own KMS wraps; only the wrapped key is stored, in a companion column.
See ``docs/design.md`` for the key hierarchy, formats, threat model and failure semantics.
"""

from ._cmk import CMK as CMK
from ._cmk import EncryptedDocument as EncryptedDocument
from ._cmk import TenantCheck as TenantCheck
from ._mapping import tenant_column as tenant_column
from .audit import AuditEvent as AuditEvent
from .audit import LoggingAuditSink as LoggingAuditSink
from .context import TenantContext as TenantContext
from .context import cross_tenant_context as cross_tenant_context
from .context import current_context as current_context
from .context import tenant_context as tenant_context
from .errors import AuditError as AuditError
from .errors import CMKError as CMKError
from .errors import ConfigurationError as ConfigurationError
from .errors import DecryptionError as DecryptionError
from .errors import DeliveryError as DeliveryError
from .errors import IndexNotReadyError as IndexNotReadyError
from .errors import InvalidValueError as InvalidValueError
from .errors import KeyAccessDeniedError as KeyAccessDeniedError
from .errors import KeyAccessError as KeyAccessError
from .errors import KeyNotFoundError as KeyNotFoundError
from .errors import KMSUnavailableError as KMSUnavailableError
from .errors import NoTenantError as NoTenantError
from .errors import PlaintextWriteError as PlaintextWriteError
from .errors import RegistryConflictError as RegistryConflictError
from .errors import RegistryIntegrityError as RegistryIntegrityError
from .errors import TenantContextError as TenantContextError
from .errors import TenantMismatchError as TenantMismatchError
from .errors import TenantNotConfiguredError as TenantNotConfiguredError
from .errors import TenantRevokedError as TenantRevokedError
from .errors import UnsupportedQueryError as UnsupportedQueryError
from .providers import KeyProvider as KeyProvider
from .search import BlindIndex as BlindIndex
from .types import EDEKType as EDEKType
from .types import EncryptedMixin as EncryptedMixin
from .types import EncryptedType as EncryptedType
from .types import EncryptedValue as EncryptedValue

__all__ = [
    "CMK",
    "AuditError",
    "AuditEvent",
    "BlindIndex",
    "CMKError",
    "ConfigurationError",
    "DecryptionError",
    "DeliveryError",
    "EDEKType",
    "EncryptedDocument",
    "EncryptedMixin",
    "EncryptedType",
    "EncryptedValue",
    "IndexNotReadyError",
    "InvalidValueError",
    "KMSUnavailableError",
    "KeyAccessDeniedError",
    "KeyAccessError",
    "KeyNotFoundError",
    "KeyProvider",
    "LoggingAuditSink",
    "NoTenantError",
    "PlaintextWriteError",
    "RegistryConflictError",
    "RegistryIntegrityError",
    "TenantCheck",
    "TenantContext",
    "TenantContextError",
    "TenantMismatchError",
    "TenantNotConfiguredError",
    "TenantRevokedError",
    "UnsupportedQueryError",
    "cross_tenant_context",
    "current_context",
    "tenant_column",
    "tenant_context",
]

__version__ = "0.1.0"
