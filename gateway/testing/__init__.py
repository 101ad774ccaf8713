"""Fakes of Braze and Didomi, and a throwaway PostgreSQL, for tests, benchmarks and the demo."""
