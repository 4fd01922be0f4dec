//! Reading `.npy` data sets in the layout of ../shared/data, and the benchmark split.
