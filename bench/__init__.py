"""trex-bench: load tests of the T-REX solve service against the token-by-token baseline.

bench/cli.py runs it; bench/load.py generates the load, bench/servers.py starts the servers
and the in-process engine, bench/report.py writes the tables and plots.
"""
