# The kernels papermill starts for the DVC stages (dvc.yaml sets IPYTHONDIR=.ipython): warnings and errors
# of the notebooks still reach the executed notebook; only the kernel's own start-up log is quieted, whose
# "Kernel is running over TCP without encryption" warning (a local kernel on 127.0.0.1) printed once per
# stage in the `make repro` terminal. It also keeps a user's own IPython profile out of the pipeline.
c.Application.log_level = "ERROR"  # noqa: F821
