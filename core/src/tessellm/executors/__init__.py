"""Executors that run one model runner per tensor-parallel rank in other processes.

``mp`` spawns one local process per rank; ``ray`` starts one Ray actor per rank, possibly on
several machines. Both drive the same :class:`~tessellm.executors.worker.Worker`.
"""
