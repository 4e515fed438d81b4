"""A real RTSP server for the tests: GStreamer's gst-rtsp-server (Debian packages), run with the system Python.

    /usr/bin/python3 tests/support/rtsp_server.py PORT      serves rtsp://127.0.0.1:PORT/line (H.264, 10 fps)
"""

import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

Gst.init(None)
server = GstRtspServer.RTSPServer()
server.set_address("127.0.0.1")
server.set_service(sys.argv[1])
factory = GstRtspServer.RTSPMediaFactory()
factory.set_launch("( videotestsrc is-live=true pattern=smpte ! video/x-raw,width=160,height=120,framerate=10/1 "
                   "! x264enc tune=zerolatency speed-preset=ultrafast key-int-max=10 ! rtph264pay name=pay0 pt=96 )")
factory.set_shared(True)
server.get_mount_points().add_factory("/line", factory)
server.attach(None)
print("ready", flush=True)
GLib.MainLoop().run()
