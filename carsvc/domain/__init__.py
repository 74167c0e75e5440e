"""Domain code: registry, runs, workers, state, budget, mailbox, events.

Nothing in this package imports grpc. It uses the generated protobuf message
classes only as data (agent specs and outputs travel to workers unchanged).
"""
