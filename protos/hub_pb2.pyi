from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReleaseRef(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    def __init__(self, round: _Optional[int] = ...) -> None: ...

class ListReleasesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReleaseInfo(_message.Message):
    __slots__ = ("round", "total_bytes", "files", "base")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    round: int
    total_bytes: int
    files: int
    base: bool
    def __init__(self, round: _Optional[int] = ..., total_bytes: _Optional[int] = ..., files: _Optional[int] = ..., base: bool = ...) -> None: ...

class ListReleasesReply(_message.Message):
    __slots__ = ("releases", "latest_round", "tier")
    RELEASES_FIELD_NUMBER: _ClassVar[int]
    LATEST_ROUND_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    releases: _containers.RepeatedCompositeFieldContainer[ReleaseInfo]
    latest_round: int
    tier: str
    def __init__(self, releases: _Optional[_Iterable[_Union[ReleaseInfo, _Mapping]]] = ..., latest_round: _Optional[int] = ..., tier: _Optional[str] = ...) -> None: ...

class GetManifestRequest(_message.Message):
    __slots__ = ("release",)
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    release: ReleaseRef
    def __init__(self, release: _Optional[_Union[ReleaseRef, _Mapping]] = ...) -> None: ...

class SignedManifest(_message.Message):
    __slots__ = ("manifest_json", "signature")
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    manifest_json: bytes
    signature: bytes
    def __init__(self, manifest_json: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("release", "path", "offset", "chunk_bytes")
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    release: ReleaseRef
    path: str
    offset: int
    chunk_bytes: int
    def __init__(self, release: _Optional[_Union[ReleaseRef, _Mapping]] = ..., path: _Optional[str] = ..., offset: _Optional[int] = ..., chunk_bytes: _Optional[int] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("offset", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "max_new_tokens")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    max_new_tokens: int
    def __init__(self, prompt: _Optional[str] = ..., max_new_tokens: _Optional[int] = ...) -> None: ...

class GenerateChunk(_message.Message):
    __slots__ = ("text", "prompt_tokens", "completion_tokens", "release_round")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RELEASE_ROUND_FIELD_NUMBER: _ClassVar[int]
    text: str
    prompt_tokens: int
    completion_tokens: int
    release_round: int
    def __init__(self, text: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., release_round: _Optional[int] = ...) -> None: ...

class GetUsageRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Usage(_message.Message):
    __slots__ = ("member", "tier", "share", "quota_tokens", "used_tokens", "period_start", "as_of_round", "log_size", "log_root", "log_signature", "log_time", "debits", "period_days")
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    QUOTA_TOKENS_FIELD_NUMBER: _ClassVar[int]
    USED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PERIOD_START_FIELD_NUMBER: _ClassVar[int]
    AS_OF_ROUND_FIELD_NUMBER: _ClassVar[int]
    LOG_SIZE_FIELD_NUMBER: _ClassVar[int]
    LOG_ROOT_FIELD_NUMBER: _ClassVar[int]
    LOG_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    LOG_TIME_FIELD_NUMBER: _ClassVar[int]
    DEBITS_FIELD_NUMBER: _ClassVar[int]
    PERIOD_DAYS_FIELD_NUMBER: _ClassVar[int]
    member: str
    tier: str
    share: float
    quota_tokens: int
    used_tokens: int
    period_start: str
    as_of_round: int
    log_size: int
    log_root: str
    log_signature: bytes
    log_time: str
    debits: _containers.RepeatedCompositeFieldContainer[Debit]
    period_days: int
    def __init__(self, member: _Optional[str] = ..., tier: _Optional[str] = ..., share: _Optional[float] = ..., quota_tokens: _Optional[int] = ..., used_tokens: _Optional[int] = ..., period_start: _Optional[str] = ..., as_of_round: _Optional[int] = ..., log_size: _Optional[int] = ..., log_root: _Optional[str] = ..., log_signature: _Optional[bytes] = ..., log_time: _Optional[str] = ..., debits: _Optional[_Iterable[_Union[Debit, _Mapping]]] = ..., period_days: _Optional[int] = ...) -> None: ...

class Debit(_message.Message):
    __slots__ = ("index", "entry", "proof")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    PROOF_FIELD_NUMBER: _ClassVar[int]
    index: int
    entry: bytes
    proof: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, index: _Optional[int] = ..., entry: _Optional[bytes] = ..., proof: _Optional[_Iterable[bytes]] = ...) -> None: ...
