//! Block allocator (being written).
