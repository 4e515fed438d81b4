// A Sparkplug B host application built from parts we did not write: MQTT.js for the broker, Eclipse Tahu's
// sparkplug-payload for the protobuf. Usage: node sparkplug_host.js '<json: url, username, password, clientId>'.
// It prints one JSON line per message it receives ({"topic", "payload"}, decoded by Tahu) and takes one JSON
// command per line on stdin: {"publish": topic, "metrics": [Tahu metric objects]} or {"quit": true}.
// Like a real host, it reads a data message's metric types from the birth that declared their aliases
// (Sparkplug 3.0: data messages need not repeat the datatype, and Tahu's decoder needs it).
"use strict";
const mqtt = require("mqtt");
const readline = require("readline");
const sparkplug = require("sparkplug-payload").get("spBv1.0");
const Proto = require("sparkplug-payload/lib/sparkplugPayloadProto").org.eclipse.tahu.protobuf.Payload;

const args = JSON.parse(process.argv[2]);
const declared = {};  // device topic key -> {alias: datatype}, from NBIRTH/DBIRTH
const say = (line) => process.stdout.write(JSON.stringify(line, (key, value) =>
    (value && typeof value === "object" && typeof value.toNumber === "function") ? value.toNumber() : value) + "\n");

function decode(topic, message) {
    const [, group, kind, node, device] = topic.split("/");
    const key = `${group}/${node}/${device || ""}`;
    if (kind === "STATE") return JSON.parse(message.toString());
    const raw = Proto.decode(message);
    if (kind.endsWith("BIRTH")) {
        declared[key] = {};
        for (const metric of raw.metrics) if (metric.alias != null) declared[key][Number(metric.alias)] = metric.datatype;
    } else if (kind.endsWith("DATA")) {
        const types = declared[key] || {};
        for (const metric of raw.metrics) {
            if (!metric.datatype) {
                metric.datatype = types[Number(metric.alias)];
                if (metric.datatype == null) return { error: `alias ${metric.alias} was never declared in a birth` };
                metric.typedByHost = true;
            }
        }
        const payload = sparkplug.decodePayload(Proto.encode(raw).finish());
        payload.untyped = raw.metrics.filter((m) => m.typedByHost).length;
        return payload;
    }
    return sparkplug.decodePayload(message);
}

const client = mqtt.connect(args.url, { username: args.username, password: args.password, clientId: args.clientId,
                                        clean: false, reconnectPeriod: 300, protocolVersion: 4 });
client.on("connect", () => client.subscribe("spBv1.0/#", { qos: 1 }, (err) => say({ subscribed: !err })));
client.on("message", (topic, message) => {
    let payload;
    try {
        payload = decode(topic, message);
    } catch (err) {
        payload = { error: `Tahu could not decode it: ${err.message}` };
    }
    say({ topic, payload });
});
client.on("error", (err) => say({ mqtt_error: err.message }));

readline.createInterface({ input: process.stdin }).on("line", (line) => {
    const command = JSON.parse(line);
    if (command.quit) {
        client.end(false, () => process.exit(0));
        return;
    }
    const body = sparkplug.encodePayload({ timestamp: Date.now(), metrics: command.metrics });
    client.publish(command.publish, Buffer.from(body), { qos: 0 }, (err) => say({ published: command.publish,
                                                                                   error: err ? err.message : null }));
});
