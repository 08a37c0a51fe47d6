// The operator page's script: polls api/status and draws what it says. No framework, no
// external asset; the charts are inline SVG.
'use strict';
(function () {
  const token = new URLSearchParams(location.search).get('token');
  const headers = token ? { Authorization: 'Bearer ' + token } : {};
  const SVG = 'http://www.w3.org/2000/svg';
  const ROUNDS_SHOWN = 50;
  const $ = (id) => document.getElementById(id);
  const set = (id, v) => { $(id).textContent = v; };
  let deadlineAt = null;
  let busy = false;

  const pct = (a) => (a == null ? '–' : (a * 100).toFixed(2) + '%');
  const fixed = (x, d) => (x == null ? '–' : Number(x).toFixed(d));
  function duration(ms) {
    if (ms == null) return '–';
    if (ms < 1000) return Math.round(ms) + ' ms';
    const s = ms / 1000;
    if (s < 60) return s.toFixed(s < 10 ? 1 : 0) + ' s';
    const m = Math.floor(s / 60);
    return m + ' min ' + Math.floor(s - 60 * m) + ' s';
  }
  function ago(now, t) {
    if (t == null) return '–';
    const d = Math.max(0, now - t);
    if (d < 60) return d + ' s ago';
    if (d < 3600) return Math.floor(d / 60) + ' min ago';
    return Math.floor(d / 3600) + ' h ago';
  }
  function bytes(n) {
    if (n == null) return '–';
    if (n < 1024) return n + ' B';
    if (n < 1048576) return (n / 1024).toFixed(1) + ' KiB';
    return (n / 1048576).toFixed(1) + ' MiB';
  }
  function cells(values) {
    const tr = document.createElement('tr');
    for (const v of values) {
      const td = document.createElement('td');
      if (Array.isArray(v)) { td.textContent = v[0]; td.className = v[1]; } else { td.textContent = v; }
      tr.appendChild(td);
    }
    return tr;
  }
  const fill = (id, rows) => $(id).tBodies[0].replaceChildren(...rows);
  const yesNo = (b) => (b ? ['yes', 'yes'] : ['no', 'no']);

  function svg(name, attrs, text) {
    const e = document.createElementNS(SVG, name);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (text != null) e.textContent = text;
    return e;
  }
  // A round-number axis max for values up to `v`.
  function niceMax(v) {
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }
  function label(v) {
    return Math.abs(v) >= 100 || Number.isInteger(v) ? String(Math.round(v)) : v.toPrecision(2).replace(/\.?0+$/, '');
  }
  // Draws `rounds` on `el`: series `left` on the left axis, `right` on the right one. A series
  // is {name, unit, color, value(round) -> number or null, max (optional)}.
  function chart(el, rounds, left, right) {
    const W = 600, H = 270, m = { l: 58, r: 62, t: 30, b: 42 };
    const pw = W - m.l - m.r, ph = H - m.t - m.b;
    el.replaceChildren();
    if (rounds.length === 0) {
      el.appendChild(svg('text', { x: W / 2, y: H / 2, 'text-anchor': 'middle', class: 'muted' }, 'no round closed yet'));
      return;
    }
    const x0 = rounds[0].round, x1 = Math.max(rounds[rounds.length - 1].round, x0 + 1);
    const X = (x) => m.l + ((x - x0) / (x1 - x0)) * pw;
    const ticks = 5;
    const scale = (s) => {
      const vals = rounds.map(s.value).filter((v) => v != null && isFinite(v));
      const hi = s.max != null ? s.max : niceMax(1.05 * Math.max(0, ...vals));
      return { hi, Y: (v) => m.t + ph - (v / hi) * ph };
    };
    const L = scale(left), R = scale(right);
    for (let i = 0; i <= ticks; i++) {
      const y = m.t + ph - (i / ticks) * ph;
      el.appendChild(svg('line', { x1: m.l, x2: m.l + pw, y1: y, y2: y, class: 'grid' }));
      el.appendChild(svg('text', { x: m.l - 6, y: y + 4, 'text-anchor': 'end' }, label((L.hi * i) / ticks)));
      el.appendChild(svg('text', { x: m.l + pw + 6, y: y + 4 }, label((R.hi * i) / ticks)));
    }
    const span = x1 - x0, step = Math.max(1, Math.ceil(span / 10));
    for (let x = x0; x <= x1; x += step) {
      el.appendChild(svg('line', { x1: X(x), x2: X(x), y1: m.t + ph, y2: m.t + ph + 4, class: 'axis' }));
      el.appendChild(svg('text', { x: X(x), y: m.t + ph + 17, 'text-anchor': 'middle' }, String(x)));
    }
    el.appendChild(svg('line', { x1: m.l, x2: m.l + pw, y1: m.t + ph, y2: m.t + ph, class: 'axis' }));
    el.appendChild(svg('line', { x1: m.l, x2: m.l, y1: m.t, y2: m.t + ph, class: 'axis' }));
    el.appendChild(svg('line', { x1: m.l + pw, x2: m.l + pw, y1: m.t, y2: m.t + ph, class: 'axis' }));
    el.appendChild(svg('text', { x: m.l + pw / 2, y: H - 6, 'text-anchor': 'middle' }, 'round'));
    const title = (s, x, angle) => {
      const t = svg('text', { x: 0, y: 0, 'text-anchor': 'middle', fill: s.color, transform: `translate(${x},${m.t + ph / 2}) rotate(${angle})` },
        s.unit ? `${s.name} (${s.unit})` : s.name);
      t.style.fill = s.color;
      el.appendChild(t);
    };
    title(left, 14, -90);
    title(right, W - 10, 90);
    // Legend, top left.
    [left, right].forEach((s, i) => {
      const x = m.l + 8 + i * 190;
      el.appendChild(svg('line', { x1: x, x2: x + 18, y1: 14, y2: 14, stroke: s.color, 'stroke-width': 2.5 }));
      el.appendChild(svg('text', { x: x + 24, y: 18 }, s.unit ? `${s.name} (${s.unit}, ${i ? 'right' : 'left'})` : `${s.name} (${i ? 'right' : 'left'})`));
    });
    for (const [s, sc] of [[left, L], [right, R]]) {
      const pts = rounds.filter((r) => s.value(r) != null && isFinite(s.value(r))).map((r) => [X(r.round), sc.Y(s.value(r))]);
      if (pts.length > 1) {
        el.appendChild(svg('polyline', { points: pts.map((p) => p.join(',')).join(' '), fill: 'none', stroke: s.color, 'stroke-width': 2 }));
      }
      for (const [x, y] of pts) el.appendChild(svg('circle', { cx: x, cy: y, r: 3, fill: s.color }));
    }
  }

  function render(d) {
    const s = d.status;
    const phase = $('phase');
    phase.textContent = s.phase;
    phase.className = 'badge ' + (s.phase === 'training' ? 'training' : s.phase === 'idle' ? '' : 'waiting');
    const o = s.open_round;
    if (o) {
      set('round-title', 'Round ' + o.round);
      $('round-progress').max = Math.max(1, o.wanted);
      $('round-progress').value = Math.min(o.devices_reporting, o.wanted);
      set('round-detail', `${o.devices_reporting} of ${o.wanted} wanted reporting (${o.selected} selected)`);
      deadlineAt = performance.now() + o.deadline_in_ms;
    } else {
      set('round-title', 'No round open');
      $('round-progress').value = 0;
      set('round-detail', s.rounds_left > 0 ? `${s.rounds_left} queued, waiting for enough devices` : 'idle: no round queued');
      deadlineAt = null;
    }
    tick();
    set('model-version', s.model_version);
    set('model-hash', 'sha256 ' + s.model_hash.slice(0, 16) + '…');
    set('rounds-done', s.rounds.length);
    set('rounds-left', s.rounds_left);
    const evaluated = s.rounds.filter((r) => r.accuracy != null);
    set('last-accuracy', evaluated.length ? pct(evaluated[evaluated.length - 1].accuracy) : '–');
    set('devices-connected', s.devices_connected.length);
    set('devices-known', s.devices_known);
    // A regional aggregator: its standing with its root.
    const u = s.upstream;
    $('upstream').hidden = !u;
    if (u) {
      const task = u.root_round == null
        ? 'no task from the root yet'
        : `root round ${u.root_round} on root v${u.root_version} (as v${u.adopted_as}), ${u.uploaded ? 'result acknowledged' : 'in progress'}`;
      const tier = u.regional_model ? `; regional model v${u.regional_model.version}` : '';
      set('upstream', `Region: root ${u.connected ? 'connected' : 'NOT CONNECTED'}; ${task}${tier}`);
    }
    const p = s.privacy;
    if (!p) {
      set('epsilon-left', 'off');
      $('epsilon-meter').value = 0;
      set('epsilon-detail', 'no central differential privacy');
    } else if (p.target_epsilon != null) {
      set('epsilon-left', `ε ${fixed(Math.max(0, p.target_epsilon - p.epsilon), 3)} left`);
      $('epsilon-meter').max = p.target_epsilon;
      $('epsilon-meter').value = Math.min(p.epsilon, p.target_epsilon);
      set('epsilon-detail', `ε ${fixed(p.epsilon, 3)} spent of ${p.target_epsilon} at δ ${Number(p.delta).toExponential(0)} (z ${p.noise_multiplier}, clip ${fixed(p.clip_norm, 3)})`);
    } else {
      set('epsilon-left', `ε ${fixed(p.epsilon, 3)} spent`);
      $('epsilon-meter').value = 0;
      set('epsilon-detail', `no budget set; δ ${Number(p.delta).toExponential(0)} (z ${p.noise_multiplier}, clip ${fixed(p.clip_norm, 3)})`);
    }

    const shown = s.rounds.slice(-ROUNDS_SHOWN);
    chart($('chart-quality'), shown,
      { name: 'accuracy', unit: '%', color: '#1f6fd1', max: 100, value: (r) => (r.accuracy == null ? null : r.accuracy * 100) },
      { name: 'training loss', unit: '', color: '#d9730d', value: (r) => (r.failed_reason == null ? r.train_loss : null) });
    chart($('chart-cost'), shown,
      { name: 'epsilon spent', unit: 'ε', color: '#7b3fc4', value: (r) => (r.privacy ? r.privacy.epsilon : null) },
      { name: 'duration', unit: 's', color: '#2e8540', value: (r) => (r.duration_ms == null ? null : r.duration_ms / 1000) });

    fill('rounds', s.rounds.slice(-12).reverse().map((r) => cells([
      r.round, 'v' + r.model_version, `${r.devices_reporting}/${r.selected}`, r.failures, r.stragglers, r.samples,
      fixed(r.train_loss, 4), pct(r.accuracy), r.privacy ? fixed(r.privacy.epsilon, 4) : '–', duration(r.duration_ms),
      r.failed_reason == null ? ['aggregated', 'yes'] : ['failed: ' + r.failed_reason, 'bad'],
    ])));
    fill('devices', d.devices.map((v) => {
      const c = v.capabilities;
      return cells([
        v.id, yesNo(v.connected), v.running == null ? '–' : 'v' + v.running, ago(d.now, v.last_seen),
        c ? c.backend : '–', c ? c.memory_mb + ' MiB' : '–', c ? c.num_samples : '–',
        c ? yesNo(c.charging) : '–', c ? yesNo(c.unmetered) : '–',
      ]);
    }));
    fill('models', d.models.slice().reverse().map((m) => cells([
      'v' + m.version, m.role, m.architecture, m.round, pct(m.accuracy), bytes(m.size_bytes),
      m.epsilon == null ? '–' : fixed(m.epsilon, 4), m.signed ? ['signed', 'yes'] : ['unsigned', 'no'],
      m.promoted ? [`promoted, ${m.devices_running} devices`, 'yes'] : m.devices_running ? `${m.devices_running} devices` : '',
    ])));
  }

  function tick() {
    set('deadline', deadlineAt == null ? '–' : duration(Math.max(0, deadlineAt - performance.now())));
  }

  async function poll() {
    if (busy) return;
    busy = true;
    const updated = $('updated');
    try {
      const r = await fetch('api/status', { headers, cache: 'no-store' });
      if (!r.ok) throw new Error('HTTP ' + r.status + (r.status === 401 ? ': open this page as /?token=TOKEN' : ''));
      render(await r.json());
      updated.textContent = 'updated ' + new Date().toLocaleTimeString();
      updated.className = 'muted';
    } catch (e) {
      updated.textContent = 'cannot reach the coordinator: ' + e.message;
      updated.className = 'muted error';
    } finally {
      busy = false;
    }
  }

  poll();
  setInterval(poll, 1500);
  setInterval(tick, 250);
})();
