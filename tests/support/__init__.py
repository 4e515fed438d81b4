"""What the tests share: a real broker and its clients, the runtime as a process, parts, the GPU check."""
