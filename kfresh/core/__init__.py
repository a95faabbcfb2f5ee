"""The base layer every wing imports: typed config, domain errors, logs, metrics, files, time, networking.

Nothing here imports another part of kfresh (the import-graph test keeps it so).
"""
