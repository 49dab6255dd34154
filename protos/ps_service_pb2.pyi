from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FloatWire(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FLOAT_WIRE_FLOAT32: _ClassVar[FloatWire]
    FLOAT_WIRE_FLOAT16: _ClassVar[FloatWire]
    FLOAT_WIRE_BFLOAT16: _ClassVar[FloatWire]
FLOAT_WIRE_FLOAT32: FloatWire
FLOAT_WIRE_FLOAT16: FloatWire
FLOAT_WIRE_BFLOAT16: FloatWire

class RequestTag(_message.Message):
    __slots__ = ("client_id", "seq")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    seq: int
    def __init__(self, client_id: _Optional[str] = ..., seq: _Optional[int] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("data", "shape", "align")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    ALIGN_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    align: bytes
    def __init__(self, data: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ..., align: _Optional[bytes] = ...) -> None: ...

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShardInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TableInfo(_message.Message):
    __slots__ = ("name", "dim_size", "num_segments", "size", "config", "hash_filter", "extra_restore_names", "saver_parallel", "max_update_ts", "memory_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIM_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    HASH_FILTER_FIELD_NUMBER: _ClassVar[int]
    EXTRA_RESTORE_NAMES_FIELD_NUMBER: _ClassVar[int]
    SAVER_PARALLEL_FIELD_NUMBER: _ClassVar[int]
    MAX_UPDATE_TS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    dim_size: int
    num_segments: int
    size: int
    config: bytes
    hash_filter: str
    extra_restore_names: _containers.RepeatedScalarFieldContainer[str]
    saver_parallel: int
    max_update_ts: int
    memory_bytes: int
    def __init__(self, name: _Optional[str] = ..., dim_size: _Optional[int] = ..., num_segments: _Optional[int] = ..., size: _Optional[int] = ..., config: _Optional[bytes] = ..., hash_filter: _Optional[str] = ..., extra_restore_names: _Optional[_Iterable[str]] = ..., saver_parallel: _Optional[int] = ..., max_update_ts: _Optional[int] = ..., memory_bytes: _Optional[int] = ...) -> None: ...

class HashFilterInfo(_message.Message):
    __slots__ = ("name", "filter_type", "enabled", "split_num", "failure_count", "fill_ratio")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FILTER_TYPE_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    SPLIT_NUM_FIELD_NUMBER: _ClassVar[int]
    FAILURE_COUNT_FIELD_NUMBER: _ClassVar[int]
    FILL_RATIO_FIELD_NUMBER: _ClassVar[int]
    name: str
    filter_type: str
    enabled: bool
    split_num: int
    failure_count: int
    fill_ratio: float
    def __init__(self, name: _Optional[str] = ..., filter_type: _Optional[str] = ..., enabled: _Optional[bool] = ..., split_num: _Optional[int] = ..., failure_count: _Optional[int] = ..., fill_ratio: _Optional[float] = ...) -> None: ...

class ShardInfo(_message.Message):
    __slots__ = ("shard_index", "num_shards", "tables", "hash_filters", "version", "cluster_id")
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    HASH_FILTERS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    shard_index: int
    num_shards: int
    tables: _containers.RepeatedCompositeFieldContainer[TableInfo]
    hash_filters: _containers.RepeatedCompositeFieldContainer[HashFilterInfo]
    version: str
    cluster_id: str
    def __init__(self, shard_index: _Optional[int] = ..., num_shards: _Optional[int] = ..., tables: _Optional[_Iterable[_Union[TableInfo, _Mapping]]] = ..., hash_filters: _Optional[_Iterable[_Union[HashFilterInfo, _Mapping]]] = ..., version: _Optional[str] = ..., cluster_id: _Optional[str] = ...) -> None: ...

class JoinClusterRequest(_message.Message):
    __slots__ = ("cluster_id", "shard_index", "num_shards")
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    cluster_id: str
    shard_index: int
    num_shards: int
    def __init__(self, cluster_id: _Optional[str] = ..., shard_index: _Optional[int] = ..., num_shards: _Optional[int] = ...) -> None: ...

class CreateHashFilterRequest(_message.Message):
    __slots__ = ("name", "enable_hash_filter", "occurrence_threshold_config", "capacity", "split_num", "equal_probability", "filter_type")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ENABLE_HASH_FILTER_FIELD_NUMBER: _ClassVar[int]
    OCCURRENCE_THRESHOLD_CONFIG_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    SPLIT_NUM_FIELD_NUMBER: _ClassVar[int]
    EQUAL_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    FILTER_TYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    enable_hash_filter: bool
    occurrence_threshold_config: bytes
    capacity: int
    split_num: int
    equal_probability: bool
    filter_type: str
    def __init__(self, name: _Optional[str] = ..., enable_hash_filter: _Optional[bool] = ..., occurrence_threshold_config: _Optional[bytes] = ..., capacity: _Optional[int] = ..., split_num: _Optional[int] = ..., equal_probability: _Optional[bool] = ..., filter_type: _Optional[str] = ...) -> None: ...

class CreateTableRequest(_message.Message):
    __slots__ = ("name", "config", "hash_filter", "extra_restore_names", "saver_parallel", "allow_existing", "monolith_quirks")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    HASH_FILTER_FIELD_NUMBER: _ClassVar[int]
    EXTRA_RESTORE_NAMES_FIELD_NUMBER: _ClassVar[int]
    SAVER_PARALLEL_FIELD_NUMBER: _ClassVar[int]
    ALLOW_EXISTING_FIELD_NUMBER: _ClassVar[int]
    MONOLITH_QUIRKS_FIELD_NUMBER: _ClassVar[int]
    name: str
    config: bytes
    hash_filter: str
    extra_restore_names: _containers.RepeatedScalarFieldContainer[str]
    saver_parallel: int
    allow_existing: bool
    monolith_quirks: bool
    def __init__(self, name: _Optional[str] = ..., config: _Optional[bytes] = ..., hash_filter: _Optional[str] = ..., extra_restore_names: _Optional[_Iterable[str]] = ..., saver_parallel: _Optional[int] = ..., allow_existing: _Optional[bool] = ..., monolith_quirks: _Optional[bool] = ...) -> None: ...

class CreateResponse(_message.Message):
    __slots__ = ("created",)
    CREATED_FIELD_NUMBER: _ClassVar[int]
    created: bool
    def __init__(self, created: _Optional[bool] = ...) -> None: ...

class ListTablesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTablesResponse(_message.Message):
    __slots__ = ("names",)
    NAMES_FIELD_NUMBER: _ClassVar[int]
    names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, names: _Optional[_Iterable[str]] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("table", "ids", "values_wire")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    VALUES_WIRE_FIELD_NUMBER: _ClassVar[int]
    table: str
    ids: Tensor
    values_wire: FloatWire
    def __init__(self, table: _Optional[str] = ..., ids: _Optional[_Union[Tensor, _Mapping]] = ..., values_wire: _Optional[_Union[FloatWire, str]] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: Tensor
    def __init__(self, values: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class LookupEntryRequest(_message.Message):
    __slots__ = ("table", "ids")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    table: str
    ids: Tensor
    def __init__(self, table: _Optional[str] = ..., ids: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class LookupEntryResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, entries: _Optional[_Iterable[bytes]] = ...) -> None: ...

class AssignRequest(_message.Message):
    __slots__ = ("table", "ids", "values", "req_time", "tag")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    REQ_TIME_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    table: str
    ids: Tensor
    values: Tensor
    req_time: int
    tag: RequestTag
    def __init__(self, table: _Optional[str] = ..., ids: _Optional[_Union[Tensor, _Mapping]] = ..., values: _Optional[_Union[Tensor, _Mapping]] = ..., req_time: _Optional[int] = ..., tag: _Optional[_Union[RequestTag, _Mapping]] = ...) -> None: ...

class ApplyGradientsRequest(_message.Message):
    __slots__ = ("table", "ids", "grads", "learning_rates", "global_step", "enable_dedup", "req_time", "grads_wire", "tag")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATES_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_STEP_FIELD_NUMBER: _ClassVar[int]
    ENABLE_DEDUP_FIELD_NUMBER: _ClassVar[int]
    REQ_TIME_FIELD_NUMBER: _ClassVar[int]
    GRADS_WIRE_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    table: str
    ids: Tensor
    grads: Tensor
    learning_rates: _containers.RepeatedScalarFieldContainer[float]
    global_step: int
    enable_dedup: bool
    req_time: int
    grads_wire: FloatWire
    tag: RequestTag
    def __init__(self, table: _Optional[str] = ..., ids: _Optional[_Union[Tensor, _Mapping]] = ..., grads: _Optional[_Union[Tensor, _Mapping]] = ..., learning_rates: _Optional[_Iterable[float]] = ..., global_step: _Optional[int] = ..., enable_dedup: _Optional[bool] = ..., req_time: _Optional[int] = ..., grads_wire: _Optional[_Union[FloatWire, str]] = ..., tag: _Optional[_Union[RequestTag, _Mapping]] = ...) -> None: ...

class UpdateResponse(_message.Message):
    __slots__ = ("replayed",)
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    replayed: bool
    def __init__(self, replayed: _Optional[bool] = ...) -> None: ...

class FusedBlock(_message.Message):
    __slots__ = ("table_index", "num_ids")
    TABLE_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_IDS_FIELD_NUMBER: _ClassVar[int]
    table_index: int
    num_ids: int
    def __init__(self, table_index: _Optional[int] = ..., num_ids: _Optional[int] = ...) -> None: ...

class FusedLookupRequest(_message.Message):
    __slots__ = ("tables", "blocks", "ids", "values_wire")
    TABLES_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    VALUES_WIRE_FIELD_NUMBER: _ClassVar[int]
    tables: _containers.RepeatedScalarFieldContainer[str]
    blocks: _containers.RepeatedCompositeFieldContainer[FusedBlock]
    ids: Tensor
    values_wire: FloatWire
    def __init__(self, tables: _Optional[_Iterable[str]] = ..., blocks: _Optional[_Iterable[_Union[FusedBlock, _Mapping]]] = ..., ids: _Optional[_Union[Tensor, _Mapping]] = ..., values_wire: _Optional[_Union[FloatWire, str]] = ...) -> None: ...

class FusedLookupResponse(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: Tensor
    def __init__(self, values: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class FusedOptimizeRequest(_message.Message):
    __slots__ = ("tables", "blocks", "ids", "grads", "learning_rates", "global_step", "enable_grad_accumulation", "req_time", "grads_wire", "tag")
    TABLES_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATES_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_STEP_FIELD_NUMBER: _ClassVar[int]
    ENABLE_GRAD_ACCUMULATION_FIELD_NUMBER: _ClassVar[int]
    REQ_TIME_FIELD_NUMBER: _ClassVar[int]
    GRADS_WIRE_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    tables: _containers.RepeatedScalarFieldContainer[str]
    blocks: _containers.RepeatedCompositeFieldContainer[FusedBlock]
    ids: Tensor
    grads: Tensor
    learning_rates: _containers.RepeatedScalarFieldContainer[float]
    global_step: int
    enable_grad_accumulation: bool
    req_time: int
    grads_wire: FloatWire
    tag: RequestTag
    def __init__(self, tables: _Optional[_Iterable[str]] = ..., blocks: _Optional[_Iterable[_Union[FusedBlock, _Mapping]]] = ..., ids: _Optional[_Union[Tensor, _Mapping]] = ..., grads: _Optional[_Union[Tensor, _Mapping]] = ..., learning_rates: _Optional[_Iterable[float]] = ..., global_step: _Optional[int] = ..., enable_grad_accumulation: _Optional[bool] = ..., req_time: _Optional[int] = ..., grads_wire: _Optional[_Union[FloatWire, str]] = ..., tag: _Optional[_Union[RequestTag, _Mapping]] = ...) -> None: ...

class InterceptGradientRequest(_message.Message):
    __slots__ = ("hash_filter", "ids", "grads", "tag")
    HASH_FILTER_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    hash_filter: str
    ids: Tensor
    grads: Tensor
    tag: RequestTag
    def __init__(self, hash_filter: _Optional[str] = ..., ids: _Optional[_Union[Tensor, _Mapping]] = ..., grads: _Optional[_Union[Tensor, _Mapping]] = ..., tag: _Optional[_Union[RequestTag, _Mapping]] = ...) -> None: ...

class InterceptGradientResponse(_message.Message):
    __slots__ = ("grads",)
    GRADS_FIELD_NUMBER: _ClassVar[int]
    grads: Tensor
    def __init__(self, grads: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class SizeRequest(_message.Message):
    __slots__ = ("table",)
    TABLE_FIELD_NUMBER: _ClassVar[int]
    table: str
    def __init__(self, table: _Optional[str] = ...) -> None: ...

class SizeResponse(_message.Message):
    __slots__ = ("size",)
    SIZE_FIELD_NUMBER: _ClassVar[int]
    size: int
    def __init__(self, size: _Optional[int] = ...) -> None: ...

class SaveAsTensorRequest(_message.Message):
    __slots__ = ("table", "shard_idx", "num_shards", "limit", "offset")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    SHARD_IDX_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    table: str
    shard_idx: int
    num_shards: int
    limit: int
    offset: int
    def __init__(self, table: _Optional[str] = ..., shard_idx: _Optional[int] = ..., num_shards: _Optional[int] = ..., limit: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class SaveAsTensorResponse(_message.Message):
    __slots__ = ("offset", "entries")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    offset: int
    entries: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, offset: _Optional[int] = ..., entries: _Optional[_Iterable[bytes]] = ...) -> None: ...

class SaveRequest(_message.Message):
    __slots__ = ("table", "basename")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    BASENAME_FIELD_NUMBER: _ClassVar[int]
    table: str
    basename: str
    def __init__(self, table: _Optional[str] = ..., basename: _Optional[str] = ...) -> None: ...

class SaveResponse(_message.Message):
    __slots__ = ("files", "entries")
    FILES_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    files: _containers.RepeatedScalarFieldContainer[str]
    entries: int
    def __init__(self, files: _Optional[_Iterable[str]] = ..., entries: _Optional[int] = ...) -> None: ...

class RestoreRequest(_message.Message):
    __slots__ = ("table", "basename", "validate_only")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    BASENAME_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_ONLY_FIELD_NUMBER: _ClassVar[int]
    table: str
    basename: str
    validate_only: bool
    def __init__(self, table: _Optional[str] = ..., basename: _Optional[str] = ..., validate_only: _Optional[bool] = ...) -> None: ...

class RestoreResponse(_message.Message):
    __slots__ = ("entries", "files")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    entries: int
    files: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, entries: _Optional[int] = ..., files: _Optional[_Iterable[str]] = ...) -> None: ...

class HashFilterFilesRequest(_message.Message):
    __slots__ = ("hash_filter", "basename", "validate_only")
    HASH_FILTER_FIELD_NUMBER: _ClassVar[int]
    BASENAME_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_ONLY_FIELD_NUMBER: _ClassVar[int]
    hash_filter: str
    basename: str
    validate_only: bool
    def __init__(self, hash_filter: _Optional[str] = ..., basename: _Optional[str] = ..., validate_only: _Optional[bool] = ...) -> None: ...

class HashFilterFilesResponse(_message.Message):
    __slots__ = ("files",)
    FILES_FIELD_NUMBER: _ClassVar[int]
    files: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, files: _Optional[_Iterable[str]] = ...) -> None: ...

class AdminSaveRequest(_message.Message):
    __slots__ = ("model_dir", "global_step", "max_to_keep")
    MODEL_DIR_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_STEP_FIELD_NUMBER: _ClassVar[int]
    MAX_TO_KEEP_FIELD_NUMBER: _ClassVar[int]
    model_dir: str
    global_step: int
    max_to_keep: int
    def __init__(self, model_dir: _Optional[str] = ..., global_step: _Optional[int] = ..., max_to_keep: _Optional[int] = ...) -> None: ...

class AdminRestoreRequest(_message.Message):
    __slots__ = ("model_dir", "prefix", "validate_only", "missing_ok", "reset_filters")
    MODEL_DIR_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    VALIDATE_ONLY_FIELD_NUMBER: _ClassVar[int]
    MISSING_OK_FIELD_NUMBER: _ClassVar[int]
    RESET_FILTERS_FIELD_NUMBER: _ClassVar[int]
    model_dir: str
    prefix: str
    validate_only: bool
    missing_ok: bool
    reset_filters: bool
    def __init__(self, model_dir: _Optional[str] = ..., prefix: _Optional[str] = ..., validate_only: _Optional[bool] = ..., missing_ok: _Optional[bool] = ..., reset_filters: _Optional[bool] = ...) -> None: ...

class AdminCheckpointResponse(_message.Message):
    __slots__ = ("prefix", "files", "entries", "bytes", "tables", "duration_seconds", "reset_filters")
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RESET_FILTERS_FIELD_NUMBER: _ClassVar[int]
    prefix: str
    files: _containers.RepeatedScalarFieldContainer[str]
    entries: int
    bytes: int
    tables: _containers.RepeatedScalarFieldContainer[str]
    duration_seconds: float
    reset_filters: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, prefix: _Optional[str] = ..., files: _Optional[_Iterable[str]] = ..., entries: _Optional[int] = ..., bytes: _Optional[int] = ..., tables: _Optional[_Iterable[str]] = ..., duration_seconds: _Optional[float] = ..., reset_filters: _Optional[_Iterable[str]] = ...) -> None: ...

class AdminExportRequest(_message.Message):
    __slots__ = ("model_dir", "global_step", "layout", "num_ps", "commit")
    MODEL_DIR_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_STEP_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    NUM_PS_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    model_dir: str
    global_step: int
    layout: str
    num_ps: int
    commit: bool
    def __init__(self, model_dir: _Optional[str] = ..., global_step: _Optional[int] = ..., layout: _Optional[str] = ..., num_ps: _Optional[int] = ..., commit: _Optional[bool] = ...) -> None: ...

class EvictRequest(_message.Message):
    __slots__ = ("table",)
    TABLE_FIELD_NUMBER: _ClassVar[int]
    table: str
    def __init__(self, table: _Optional[str] = ...) -> None: ...

class TableEviction(_message.Message):
    __slots__ = ("table", "evicted", "remaining")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    table: str
    evicted: int
    remaining: int
    def __init__(self, table: _Optional[str] = ..., evicted: _Optional[int] = ..., remaining: _Optional[int] = ...) -> None: ...

class EvictResponse(_message.Message):
    __slots__ = ("tables", "evicted")
    TABLES_FIELD_NUMBER: _ClassVar[int]
    EVICTED_FIELD_NUMBER: _ClassVar[int]
    tables: _containers.RepeatedCompositeFieldContainer[TableEviction]
    evicted: int
    def __init__(self, tables: _Optional[_Iterable[_Union[TableEviction, _Mapping]]] = ..., evicted: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class OperationRecord(_message.Message):
    __slots__ = ("op", "start_time", "duration_seconds", "prefix", "entries", "bytes", "error")
    OP_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    op: str
    start_time: float
    duration_seconds: float
    prefix: str
    entries: int
    bytes: int
    error: str
    def __init__(self, op: _Optional[str] = ..., start_time: _Optional[float] = ..., duration_seconds: _Optional[float] = ..., prefix: _Optional[str] = ..., entries: _Optional[int] = ..., bytes: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class TableStats(_message.Message):
    __slots__ = ("name", "entries", "memory_bytes", "dim_size", "hash_filter", "max_update_ts", "feature_eviction", "evicted_entries")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    DIM_SIZE_FIELD_NUMBER: _ClassVar[int]
    HASH_FILTER_FIELD_NUMBER: _ClassVar[int]
    MAX_UPDATE_TS_FIELD_NUMBER: _ClassVar[int]
    FEATURE_EVICTION_FIELD_NUMBER: _ClassVar[int]
    EVICTED_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    name: str
    entries: int
    memory_bytes: int
    dim_size: int
    hash_filter: str
    max_update_ts: int
    feature_eviction: bool
    evicted_entries: int
    def __init__(self, name: _Optional[str] = ..., entries: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., dim_size: _Optional[int] = ..., hash_filter: _Optional[str] = ..., max_update_ts: _Optional[int] = ..., feature_eviction: _Optional[bool] = ..., evicted_entries: _Optional[int] = ...) -> None: ...

class HashFilterStats(_message.Message):
    __slots__ = ("name", "filter_type", "enabled", "fill_ratio", "failure_count", "capacity")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FILTER_TYPE_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    FILL_RATIO_FIELD_NUMBER: _ClassVar[int]
    FAILURE_COUNT_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    name: str
    filter_type: str
    enabled: bool
    fill_ratio: float
    failure_count: int
    capacity: int
    def __init__(self, name: _Optional[str] = ..., filter_type: _Optional[str] = ..., enabled: _Optional[bool] = ..., fill_ratio: _Optional[float] = ..., failure_count: _Optional[int] = ..., capacity: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("shard_index", "num_shards", "version", "uptime_seconds", "state", "entries", "memory_bytes", "tables", "hash_filters", "last_save", "last_restore", "in_flight", "cluster_id")
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    HASH_FILTERS_FIELD_NUMBER: _ClassVar[int]
    LAST_SAVE_FIELD_NUMBER: _ClassVar[int]
    LAST_RESTORE_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_ID_FIELD_NUMBER: _ClassVar[int]
    shard_index: int
    num_shards: int
    version: str
    uptime_seconds: float
    state: str
    entries: int
    memory_bytes: int
    tables: _containers.RepeatedCompositeFieldContainer[TableStats]
    hash_filters: _containers.RepeatedCompositeFieldContainer[HashFilterStats]
    last_save: OperationRecord
    last_restore: OperationRecord
    in_flight: int
    cluster_id: str
    def __init__(self, shard_index: _Optional[int] = ..., num_shards: _Optional[int] = ..., version: _Optional[str] = ..., uptime_seconds: _Optional[float] = ..., state: _Optional[str] = ..., entries: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., tables: _Optional[_Iterable[_Union[TableStats, _Mapping]]] = ..., hash_filters: _Optional[_Iterable[_Union[HashFilterStats, _Mapping]]] = ..., last_save: _Optional[_Union[OperationRecord, _Mapping]] = ..., last_restore: _Optional[_Union[OperationRecord, _Mapping]] = ..., in_flight: _Optional[int] = ..., cluster_id: _Optional[str] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("grace_seconds",)
    GRACE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    grace_seconds: float
    def __init__(self, grace_seconds: _Optional[float] = ...) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ("in_flight", "waited_seconds")
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    WAITED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    in_flight: int
    waited_seconds: float
    def __init__(self, in_flight: _Optional[int] = ..., waited_seconds: _Optional[float] = ...) -> None: ...
