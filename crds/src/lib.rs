//! Custom resource types of peerfill.
