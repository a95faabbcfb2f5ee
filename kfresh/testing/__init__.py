"""The harness the tests and the benchmarks share: real server processes (`servers`), throwaway PostgreSQL
clusters (`pgcluster`) and a grpc.aio load driver (`load`). Nothing here is a fake; it starts real things."""
