-- omi-bridge microphone app for Brilliant Labs Frame.
--
-- Uploaded by bridge/devices/frame/session.py as the file "omi_bridge_app.lua" and started with
--   require("omi_bridge_app").run(sample_rate, bit_depth, heartbeat_timeout_seconds)
-- Loading this file has no side effects, so the host can `require` it only to read APP_HASH
-- (the host fills it in) and skip the upload when the stored copy is current.
--
-- Frame -> host, through frame.bluetooth.send (the firmware prefixes 0x01; frame.md §4):
--   MSG_AUDIO   | seq lo | seq hi | PCM      every packet exactly `chunk` PCM bytes
--   MSG_BATTERY | percent (0..100)          every BATTERY_SECONDS while the host is present
--   MSG_MIC     | 1 (on) or 0 (paused)      when the heartbeat watchdog changes the mic state
--   MSG_ERROR   | text                      the app is ending with this error (break included)
-- Host -> Frame raw data (0x01 prefix, delivered to receive_callback):
--   CMD_HEARTBEAT                            the host is alive; resumes a paused mic
--   CMD_STOP                                 the host is leaving: pause the mic now
-- The type bytes 0xB1.. avoid every prefix used by frame-sdk, frame-msg, Noa and the Omi app
-- (frame.md §8) so a stray app on the glasses cannot be mistaken for ours.

local M = {}

M.APP_HASH = "@APP_HASH@"

local MSG_AUDIO = 0xB1
local MSG_BATTERY = 0xB2
local MSG_MIC = 0xB3
local MSG_ERROR = 0xB4
local CMD_HEARTBEAT = 0xB8
local CMD_STOP = 0xB9

local HEADER_BYTES = 3          -- type + 16-bit sequence number
local MAX_CHUNK = 240           -- fits one link-layer packet at the usual 251-byte DLE (frame.md §13)
local SEQ_MODULO = 65536
local BATTERY_SECONDS = 5
local IDLE_SLEEP = 0.005        -- FIFO empty: ~1/3 of a 240-byte packet at 16 kB/s
local PAUSED_SLEEP = 0.1
local SEND_TRIES = 40           -- "bluetooth is busy" retries: ~0.1 s, then the packet is dropped
local SEND_RETRY_SLEEP = 0.0025 -- a notification slot frees every few ms (frame.md §5)
local RESTART_SLEEP = 0.2       -- stop -> start gap, as the Omi app does (frame.md §6)

local function is_break(err)
    return string.find(tostring(err), "break signal", 1, true) ~= nil
end

-- pcall that never swallows the host's break (frame.md §3).
local function try(fn, ...)
    local ok, err = pcall(fn, ...)
    if not ok and is_break(err) then
        error(err, 0)
    end
    return ok, err
end

-- Send one message; retry while the single notification slot is busy. Returns false when the
-- packet had to be dropped (no host, or the link stayed busy): its sequence number is then
-- missing on the host, which fills the gap with silence.
local function send(msg)
    for _ = 1, SEND_TRIES do
        local ok, err = try(frame.bluetooth.send, msg)
        if ok then
            return true
        end
        if not string.find(tostring(err), "busy", 1, true) then
            error(err, 0)
        end
        frame.sleep(SEND_RETRY_SLEEP)
    end
    return false
end

local function stream(sample_rate, bit_depth, heartbeat_timeout)
    local chunk = math.min(frame.bluetooth.max_length() - HEADER_BYTES, MAX_CHUNK)
    chunk = chunk - chunk % 2   -- read(n) needs an even n (frame.md §6)
    if chunk <= 0 then
        error("omib: link MTU too small")
    end

    local last_heartbeat = frame.time.utc()
    local host_left = false
    frame.bluetooth.receive_callback(function(data)
        local cmd = string.byte(data, 1)
        if cmd == CMD_HEARTBEAT then
            last_heartbeat = frame.time.utc()
            host_left = false
        elseif cmd == CMD_STOP then
            host_left = true
        end
    end)

    local mic_on = false
    local seq = 0
    local pending = ""

    local function mic_stop()
        try(frame.microphone.stop)
        -- Drain what the FIFO still holds: read() returns nil once stopped and empty.
        for _ = 1, 1000 do
            local ok, data = try(frame.microphone.read, 2 * chunk)
            if not ok or data == nil then
                break
            end
        end
        pending = ""
        mic_on = false
    end

    local function mic_start()
        mic_stop()
        local opts = { sample_rate = sample_rate, bit_depth = bit_depth }
        local ok, err = try(frame.microphone.start, opts)
        if not ok then
            if not string.find(tostring(err), "already started", 1, true) then
                error(err, 0)
            end
            mic_stop()
            frame.sleep(RESTART_SLEEP)
            frame.microphone.start(opts)
        end
        mic_on = true
    end

    mic_start()
    print("omib:ready " .. chunk)
    local next_battery = frame.time.utc()

    while true do
        local now = frame.time.utc()
        local host_present = not host_left and now - last_heartbeat <= heartbeat_timeout
        if mic_on and not host_present then
            mic_stop()
            send(string.char(MSG_MIC, 0))
        elseif not mic_on and host_present then
            mic_start()
            send(string.char(MSG_MIC, 1))
        end
        if host_present and now >= next_battery then
            send(string.char(MSG_BATTERY, math.floor(frame.battery_level())))
            next_battery = now + BATTERY_SECONDS
        end

        if not mic_on then
            frame.sleep(PAUSED_SLEEP)
        else
            local want = chunk - #pending
            want = want + want % 2
            local data = frame.microphone.read(want)
            if data == nil then
                mic_on = false   -- stopped behind our back; the next pass restarts it
            elseif #data == 0 then
                frame.sleep(IDLE_SLEEP)
            else
                pending = pending .. data
                -- Only full packets go out, so every sequence number stands for `chunk` bytes.
                while #pending >= chunk do
                    send(string.char(MSG_AUDIO, seq % 256, seq // 256) .. string.sub(pending, 1, chunk))
                    pending = string.sub(pending, chunk + 1)
                    seq = (seq + 1) % SEQ_MODULO
                end
            end
        end
    end
end

-- Run until break or error. On the way out the mic is stopped (battery) and the host is told
-- why with a retried send: a plain error print would be dropped while the slot is busy.
function M.run(sample_rate, bit_depth, heartbeat_timeout)
    local _, err = pcall(stream, sample_rate, bit_depth, heartbeat_timeout)
    pcall(frame.microphone.stop)
    local msg = string.char(MSG_ERROR) .. string.sub(tostring(err), 1, 200)
    for _ = 1, SEND_TRIES do
        if pcall(frame.bluetooth.send, msg) then
            break
        end
        pcall(frame.sleep, SEND_RETRY_SLEEP)
    end
    error(err, 0)
end

return M
