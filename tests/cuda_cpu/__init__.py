"""The CPU execution harness: the CUDA kernels of minirlhf/kernels/*.cu, compiled by the system C++
compiler and run block by block, thread by thread (cuda_cpu.h), through a stand-in of ``cupy``
(cupy_on_cpu.py) that the real launchers call."""
