"""Fit jobs on the server, web-free: records, queue and scheduling, versions (issue 10).

Module map (filled in as modules land).
"""
