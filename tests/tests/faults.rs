//! Agent and network faults on a namespace cluster (filled below).
