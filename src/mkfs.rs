//! mkfs (being written).
