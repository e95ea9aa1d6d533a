"""Worker processes: `mirror serve --workers N` runs N copies of the server on one port, one
data directory and one configuration, under a parent that supervises them (supervisor.py);
`auto` is the number of CPUs the mirror may use (cpus.py)."""
