"""The runtime: executes an OCI runtime spec (config.json) for the compute service.

``_spec`` turns hcsshim's ContainerConfig/ProcessConfig into the OCI spec; ``_native``
executes it in Python (namespaces, mounts, cgroups, capabilities); ``_cgroups`` hides the
cgroup v1/v2 difference behind one interface chosen once.
"""
