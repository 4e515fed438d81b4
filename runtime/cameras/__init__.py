"""The cameras: frames from files, folders, V4L2/GStreamer devices and RTSP streams, each read on its own thread."""
