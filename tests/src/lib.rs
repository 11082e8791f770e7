//! The netns lab shared by integration tests, benchmarks and `make demo`.
